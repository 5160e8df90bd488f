"""mlx-train's Hydra configs (a package so ``pkg://mlx_train.conf`` finds them).

``recipe/`` holds one primary config per recipe; the other folders are the config groups the
recipes compose from their defaults lists: ``model/``, ``data/``, ``optimizer/``,
``scheduler/``, ``adapter/``, ``logger/``, ``eval/`` (``eval=lm_eval``).
"""
