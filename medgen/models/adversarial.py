"""The one generator/discriminator loop every adversarial family builds on.

GAN, AGGrGAN, pix2pix, CycleGAN, AutoencoderKL and VQGAN all train a "generator" side (a
generator, a translator, an autoencoder) against one or more discriminators with manual
optimisation. What they share lives here, once:

- DDP set-up for alternating optimisers (each side's parameters get no gradient in the other
  side's step, so DistributedDataParallel needs ``find_unused_parameters=True``);
- the G/D optimiser pair (:meth:`AdversarialModule.configure_optimizers`, one scheduler per
  optimiser), and :meth:`AdversarialModule.step_optimizer` (toggle, zero, backward, step);
- EMA once per generator step (:attr:`AdversarialModule.ema_step`);
- the mapping of data units to the nets' ``[-1, 1]``.

The losses and penalties are :class:`medgen.losses.AdversarialObjective`'s (one vocabulary,
``adv_loss: non_saturating | lsgan | hinge | wgan``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medgen.models.base import GenerativeModule
from medgen.utils.instantiate import instantiate

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_GAN_OPTIMIZER", "AdversarialModule", "build_net"]

# DCGAN (Radford et al. 2016, section 4): Adam, lr 2e-4, beta1 0.5.
DEFAULT_GAN_OPTIMIZER: dict[str, Any] = {
    "_target_": "torch.optim.Adam",
    "lr": 2e-4,
    "betas": [0.5, 0.999],
}


def build_net(config: Mapping[str, Any], spatial_dims: int, what: str) -> nn.Module:
    """Instantiate a net config (``_target_`` + kwargs) with ``spatial_dims`` filled in."""
    config = dict(config)
    if "_target_" not in config:
        raise ValueError(f"the {what} config needs a _target_ (e.g. medgen.nets.DCGANGenerator)")
    config.setdefault("spatial_dims", spatial_dims)
    if config["spatial_dims"] != spatial_dims:
        raise ValueError(
            f"{what}.spatial_dims={config['spatial_dims']} differs from the model's "
            f"spatial_dims={spatial_dims}"
        )
    return instantiate(config)


class AdversarialModule(GenerativeModule):
    """Base of the adversarial families: DDP set-up, optimiser pairs, generator-step counting.

    Subclasses define :meth:`generator_parameters` and :meth:`discriminator_parameters` (or
    :meth:`optimizer_groups` for several pairs), call :meth:`step_optimizer` in their
    ``training_step`` and increment the buffer named by :attr:`generator_step_buffer` after each
    generator step; the EMA callback then averages once per generator step.

    Args:
        spatial_dims: 2 or 3.
        value_range: Data range of the images.
        optimizer_g: Optimiser config of the generator side (stored as ``optimizer_config``).
        optimizer_d: Optimiser config of the discriminators (default: ``optimizer_g``).
        scheduler: Optional scheduler config, one instance per optimiser.
        spacing: Voxel spacing of written 3D outputs.
    """

    #: Name of the buffer counting generator steps (a long tensor; summed when it has several).
    generator_step_buffer: str = "generator_steps"

    def __init__(
        self,
        *,
        spatial_dims: int,
        value_range: Sequence[float],
        optimizer_g: Mapping[str, Any],
        optimizer_d: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        spacing: Sequence[float] | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__(spatial_dims, value_range, dict(optimizer_g), scheduler, spacing)
        self.automatic_optimization = False
        self.optimizer_d_config = dict(optimizer_d or optimizer_g)
        if gradient_clip_val is not None and not float(gradient_clip_val) > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or null, got {gradient_clip_val}")
        # Lightning's trainer.gradient_clip_val does not apply to manual optimisation: the
        # families clip here, every optimiser step, by the global norm of its parameters.
        self.gradient_clip_val = None if gradient_clip_val is None else float(gradient_clip_val)

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        strategy = getattr(self._trainer, "strategy", None) if self._trainer else None
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters"):
            # Discriminator steps leave the generator without gradients (and vice versa).
            ddp_kwargs["find_unused_parameters"] = True
            log.info("%s: DDP set to find_unused_parameters=True", type(self).__name__)

    @property
    def ema_step(self) -> int:
        """Generator steps taken: the EMA callback averages once per generator step."""
        return int(getattr(self, self.generator_step_buffer).sum())

    # ----------------------------------------------------------------- optimisers
    def generator_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters of the generator side."""
        raise NotImplementedError

    def discriminator_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters of the discriminators (empty: no discriminator optimiser)."""
        raise NotImplementedError

    def optimizer_groups(self) -> list[tuple[Iterable[nn.Parameter], Mapping[str, Any]]]:
        """``(parameters, optimiser config)`` per optimiser, generator side first.

        One G/D pair by default; a model without discriminator parameters gets one optimiser.
        """
        groups = [(list(self.generator_parameters()), self.optimizer_config)]
        d_params = list(self.discriminator_parameters())
        if d_params:
            groups.append((d_params, self.optimizer_d_config))
        return groups

    def configure_optimizers(self):
        optimizers = [self.build_optimizer(p, c) for p, c in self.optimizer_groups()]
        schedulers = [self.build_scheduler(o) for o in optimizers]
        if schedulers[0] is None:
            return optimizers
        return optimizers, schedulers

    def optimizer_list(self) -> list:
        """The optimisers of :meth:`configure_optimizers`, always as a list."""
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def step_optimizer(self, optimizer, loss: Tensor, isolate: bool = True) -> None:
        """One step of ``optimizer`` on ``loss``.

        With ``isolate`` (the default), the other optimisers' parameters are frozen for the
        backward pass (Lightning's ``toggle_optimizer``), so a generator step leaves no gradient
        on the discriminator and the reverse. With ``gradient_clip_val`` the gradients of the
        optimiser's parameters are clipped to that global norm before the step.
        """
        isolate = isolate and len(self.optimizer_list()) > 1
        if isolate:
            self.toggle_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )
        optimizer.step()
        if isolate:
            self.untoggle_optimizer(optimizer)

    def count_generator_step(self, index: int | None = None) -> None:
        """Increment the generator-step counter (of member ``index`` when it has several)."""
        counter = getattr(self, self.generator_step_buffer)
        if index is None:
            counter += 1
        else:
            counter[index] += 1


def zero_step_counter(count: int | None = None) -> torch.Tensor:
    """A long zero tensor for a step-counter buffer (``count`` entries, or a scalar)."""
    return torch.zeros(() if count is None else (count,), dtype=torch.long)
