"""mlx-train: the fastai-style Learner, callbacks, schedules, data and torchtune-style recipes with Hydra configs.

Not implemented yet: this package is installable so the workspace composes, and provides no
features until its issue lands (see README.md).
"""

__version__ = "0.1.0"
