"""Learning-rate policies of pix2pix / CycleGAN, as scheduler factories for configs.

Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (pix2pix), CVPR
2017, and Zhu et al., "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
Networks" (CycleGAN), ICCV 2017: Adam at a constant rate for ``n_epochs``, then a linear decay to
zero over ``n_epochs_decay`` epochs. Their public code also offers step, plateau and cosine
policies; :func:`lr_policy` builds each as a :mod:`torch.optim.lr_scheduler` object, stepped once
per epoch.

Use it from a model config (the optimiser is filled in by the model)::

    scheduler:
      _target_: medgen.utils.schedulers.lr_policy
      policy: linear
      n_epochs: 100
      n_epochs_decay: 100
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LRScheduler,
    ReduceLROnPlateau,
    StepLR,
)

LR_POLICIES = ("linear", "step", "plateau", "cosine", "constant")


class LinearDecay:
    """Multiplier ``1 - max(0, epoch + epoch_count - n_epochs) / (n_epochs_decay + 1)``.

    The rate is constant for the first ``n_epochs`` epochs (counting from ``epoch_count``, the
    1-based epoch a resumed run starts at) and then falls linearly, reaching
    ``1 / (n_epochs_decay + 1)`` of the initial rate in the last epoch (zero one epoch later).
    A picklable callable, so :class:`~torch.optim.lr_scheduler.LambdaLR` saves it in its state.
    """

    def __init__(self, n_epochs: int, n_epochs_decay: int, epoch_count: int = 1) -> None:
        if n_epochs < 0 or n_epochs_decay < 0:
            raise ValueError(
                f"n_epochs and n_epochs_decay must be >= 0, got {n_epochs}, {n_epochs_decay}"
            )
        self.n_epochs = int(n_epochs)
        self.n_epochs_decay = int(n_epochs_decay)
        self.epoch_count = int(epoch_count)

    def __call__(self, epoch: int) -> float:
        decayed = max(0, epoch + self.epoch_count - self.n_epochs)
        return max(0.0, 1.0 - decayed / float(self.n_epochs_decay + 1))


def lr_policy(
    optimizer: Optimizer,
    policy: str = "linear",
    n_epochs: int = 100,
    n_epochs_decay: int = 100,
    epoch_count: int = 1,
    step_size: int = 50,
    gamma: float = 0.1,
    plateau_factor: float = 0.2,
    plateau_patience: int = 5,
    plateau_threshold: float = 0.01,
    plateau_mode: str = "min",
) -> LRScheduler | ReduceLROnPlateau:
    """Build one of the pix2pix/CycleGAN learning-rate policies for ``optimizer``.

    Each is meant to be stepped once per epoch.

    Args:
        optimizer: The optimiser whose rate is scheduled.
        policy: ``"linear"`` (constant for ``n_epochs`` then linear to zero over
            ``n_epochs_decay``), ``"step"`` (times ``gamma`` every ``step_size`` epochs),
            ``"plateau"`` (times ``plateau_factor`` when the monitored value has not improved by a
            relative ``plateau_threshold`` for ``plateau_patience`` epochs; step it with the value),
            ``"cosine"`` (cosine annealing to zero over ``n_epochs``) or ``"constant"``.
        n_epochs: Epochs at the initial rate (linear), or the cosine period.
        n_epochs_decay: Epochs of linear decay.
        epoch_count: 1-based epoch the run starts at (for resuming with ``linear``).
        step_size: Epochs between decays (``step``; 50 upstream).
        gamma: Decay factor (``step``).
        plateau_factor: Decay factor (``plateau``).
        plateau_patience: Epochs without improvement before a decay (``plateau``).
        plateau_threshold: Relative improvement that counts (``plateau``).
        plateau_mode: ``"min"`` for a loss, ``"max"`` for e.g. PSNR (``plateau``).

    Returns:
        A torch learning-rate scheduler.
    """
    if policy == "linear":
        return LambdaLR(optimizer, LinearDecay(n_epochs, n_epochs_decay, epoch_count))
    if policy == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    if policy == "step":
        return StepLR(optimizer, step_size=step_size, gamma=gamma)
    if policy == "plateau":
        return ReduceLROnPlateau(
            optimizer,
            mode=plateau_mode,
            factor=plateau_factor,
            threshold=plateau_threshold,
            patience=plateau_patience,
        )
    if policy == "cosine":
        return CosineAnnealingLR(optimizer, T_max=max(1, n_epochs), eta_min=0.0)
    raise ValueError(f"unknown lr policy {policy!r}; valid: {', '.join(LR_POLICIES)}")


__all__ = ["LR_POLICIES", "LinearDecay", "lr_policy"]
