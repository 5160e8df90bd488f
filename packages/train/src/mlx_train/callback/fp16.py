"""``MixedPrecision``: autocast forward passes; fp16 with a gradient scaler, or bf16 without one."""

from __future__ import annotations

import torch

from mlx_train.callback.core import Callback, CancelStepException


class MixedPrecision(Callback):
    """Run the forward pass and the loss under ``torch.autocast``; weights and optimizer state
    stay in float32.

    ``dtype``: ``torch.float16`` or ``torch.bfloat16``; default fp16 on CUDA, bf16 elsewhere.
    With fp16 a ``torch.amp.GradScaler`` scales the loss; steps whose gradients overflow are
    skipped (``CancelStepException``) and the scale adapts. ``scaler_kwargs`` go to the scaler.
    The gradients are unscaled before ``GradientClip`` (order 11) sees them.
    """

    order = 10

    def __init__(self, dtype: torch.dtype | None = None, **scaler_kwargs):
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"MixedPrecision dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.dtype, self.scaler_kwargs = dtype, scaler_kwargs
        self.scaler = None
        self._autocast = None
        self._set_up = False

    def _setup(self) -> None:
        param = next(self.learn.model.parameters(), None)
        self.device_type = param.device.type if param is not None else "cpu"
        dtype = self.dtype or (torch.float16 if self.device_type == "cuda" else torch.bfloat16)
        self.amp_dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device_type, **self.scaler_kwargs) \
            if dtype == torch.float16 else None
        self.learn.scaler = self.scaler
        self.scales = []
        self._set_up = True

    def before_fit(self):
        self._setup()

    def before_batch(self):
        if not self._set_up:  # validate() / get_preds() outside fit
            self._setup()
        self._autocast = torch.autocast(self.device_type, dtype=self.amp_dtype)
        self._autocast.__enter__()

    def after_pred(self):
        pred = self.learn.pred
        if isinstance(pred, torch.Tensor) and pred.is_floating_point() and pred.dtype != torch.float32:
            self.learn.pred = pred.float()

    def after_loss(self):
        self._exit()

    def before_backward(self):
        if self.scaler is not None:
            self.learn.loss_grad = self.scaler.scale(self.learn.loss_grad)

    # the scaler "steps" this object: it unscales the gradients and calls step() only when
    # they are finite; the real step is the learner's
    @property
    def param_groups(self):
        return self.learn.opt.param_groups

    def step(self, *args, **kwargs):
        self.skipped = False

    def before_step(self):
        self._stepped = False
        if self.scaler is None:
            return
        self.skipped = True
        self.scaler.step(self)
        self._stepped = True
        if self.skipped:
            raise CancelStepException()
        self.scales.append(self.scaler.get_scale())

    def after_step(self):
        if self.scaler is not None and getattr(self, "_stepped", False):
            self.scaler.update()
            self._stepped = False

    def _exit(self) -> None:
        if self._autocast is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None

    def after_fit(self):
        self.cleanup()
        self.learn.scaler = None
        self._set_up = False

    def cleanup(self):
        self._exit()


__all__ = ["MixedPrecision"]
