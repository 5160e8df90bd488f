"""mlx-adapters: PEFT methods (LoRA, DoRA, QLoRA, AdaLoRA, IA3, prefix and prompt tuning), NF4 quantization and PEFT-format adapter IO.

Not implemented yet: this package is installable so the workspace composes, and provides no
features until its issue lands (see README.md).
"""

__version__ = "0.1.0"
