"""Exponential moving average of one chosen submodule.

Averaging the generator's (or denoiser's) weights is standard for generative models: Karras et al.,
"Progressive Growing of GANs", ICLR 2018; Ho et al., "Denoising Diffusion Probabilistic Models",
NeurIPS 2020. Unlike Lightning's ``WeightAveraging`` (which averages the whole LightningModule),
this callback averages only ``attribute`` — e.g. ``net`` or ``generator`` — so discriminators and
loss networks cost nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from medgen.pretrained import EMA_STATE_MARKER


class EMA(L.Callback):
    """Keep an exponential moving average of ``pl_module.<attribute>``'s floating-point state.

    ``shadow = decay * shadow + (1 - decay) * weights`` after every ``every_n_steps`` optimiser
    steps (``pl_module.ema_step`` when the module defines it, e.g. a GAN's generator steps; else
    Lightning's ``global_step``; once per step, also under gradient accumulation), starting at
    ``start_step`` (before it, the shadow copies the weights). Integer buffers
    (e.g. BatchNorm's ``num_batches_tracked``) are copied. The shadow is saved in checkpoints, so a
    resumed run continues the same average; validation and export use the averaged weights when
    ``use_for_validation`` is true.

    Args:
        attribute: Name of the submodule to average (dotted paths allowed).
        decay: EMA decay in [0, 1).
        every_n_steps: Update period in optimiser steps (Medical Diffusion: 10).
        start_step: Global step before which the shadow just copies the weights (Medical
            Diffusion: 2000, with ``every_n_steps=10``, as its trainer's ``step_start_ema`` and
            ``update_ema_every``; it counts steps from 0, this callback from 1).
        use_for_validation: Swap the EMA weights in for validation and testing.
    """

    def __init__(
        self,
        attribute: str = "net",
        decay: float = 0.999,
        every_n_steps: int = 1,
        start_step: int = 0,
        use_for_validation: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.attribute = attribute
        self.decay = decay
        self.every_n_steps = max(1, int(every_n_steps))
        self.start_step = start_step
        self.use_for_validation = use_for_validation
        self.shadow: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] | None = None
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    def _module(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module.get_submodule(self.attribute)

    def _init_shadow(self, module: nn.Module) -> None:
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = self._module(pl_module)
        if not self.shadow:
            self._init_shadow(module)
        else:  # restored from a checkpoint: move to the module's device
            state = module.state_dict()
            self.shadow = {k: v.to(state[k].device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A module may count its own steps of the averaged net (a GAN's generator steps, which
        # Lightning's global_step mixes with discriminator steps); average once per such step.
        step = int(getattr(pl_module, "ema_step", trainer.global_step))
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        decay = 0.0 if step < self.start_step else self.decay
        for key, value in self._module(pl_module).state_dict().items():
            shadow = self.shadow[key]
            if shadow.dtype.is_floating_point:
                shadow.lerp_(value.detach().to(shadow.dtype), 1.0 - decay)
            else:
                shadow.copy_(value)

    @contextlib.contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Context in which ``pl_module.<attribute>`` holds the EMA weights."""
        if not self.shadow:
            yield
            return
        module = self._module(pl_module)
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow, strict=True)
        try:
            yield
        finally:
            module.load_state_dict(backup, strict=True)

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self.use_for_validation and self.shadow and self._backup is None:
            module = self._module(pl_module)
            self._backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
            module.load_state_dict(self.shadow, strict=True)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is not None:
            self._module(pl_module).load_state_dict(self._backup, strict=True)
            self._backup = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def state_dict(self) -> dict[str, Any]:
        return {
            EMA_STATE_MARKER: True,
            "attribute": self.attribute,
            "decay": self.decay,
            "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state_dict["shadow"].items()}
