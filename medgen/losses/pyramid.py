"""Multi-scale (pyramid) L1 loss of Pyramid pix2pix.

Liu, Zhu, Fu, Xu, Zhang, Liu. "BCI: Breast Cancer Immunohistochemical Image Generation through
Pyramid Pix2pix." CVPR Workshops 2022 (arXiv 2204.11425), Sec. 3.2: the L1 distance between the
generated and the real image is measured at several scales of a Gaussian pyramid, so that the
generator is rewarded for the right colour and texture at low resolution even where the adjacent
tissue sections are not aligned pixel for pixel.

Our own code from the paper's description (and REFERENCES.md): level 1 is the full-resolution
image; level ``l + 1`` is level ``l`` blurred ``num_blurs`` times by a ``kernel_size`` Gaussian
(``sigma``, reflect border, every channel separately) and then subsampled by taking every second
pixel along every spatial axis. The loss is ``sum_l w_l * mean|pred_l - target_l|``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PyramidL1Loss"]


def _gaussian_kernel(spatial_dims: int, kernel_size: int, sigma: float) -> Tensor:
    """Full ``kernel_size ** spatial_dims`` Gaussian (float64, sum 1), shape ``(1, 1, k, ...)``."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = g
    for _ in range(spatial_dims - 1):
        kernel = kernel[..., None] * g
    kernel = kernel / kernel.sum()
    return kernel[None, None]


class PyramidL1Loss(nn.Module):
    """Weighted sum of L1 distances over a Gaussian pyramid (BCI, Liu et al. 2022).

    With ``num_levels=4`` and 1024x1024 images the levels are 1024, 512, 256 and 128 pixels wide,
    each weighted 25 by default (the paper's setting). With ``num_levels=1`` the loss is
    ``level_weights * L1``, i.e. pix2pix's L1 term.

    Args:
        spatial_dims: 2 for ``(B, C, H, W)`` images, 3 for ``(B, C, D, H, W)`` volumes (the
            Gaussian is then ``k x k x k`` and the subsampling is along all three axes).
        num_levels: number of pyramid levels, the first being the full resolution.
        level_weights: one weight for every level, or a sequence of ``num_levels`` weights
            (finest first).
        num_blurs: Gaussian blurs applied between two levels.
        kernel_size: odd size of the Gaussian kernel.
        sigma: standard deviation of the Gaussian, in pixels.

    Example:
        >>> loss = PyramidL1Loss()
        >>> loss(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)).shape
        torch.Size([])
    """

    kernel: Tensor

    def __init__(
        self,
        spatial_dims: int = 2,
        num_levels: int = 4,
        level_weights: float | Sequence[float] = 25.0,
        num_blurs: int = 4,
        kernel_size: int = 3,
        sigma: float = 1.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if int(num_levels) != num_levels or num_levels < 1:
            raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
        if int(num_blurs) != num_blurs or num_blurs < 0:
            raise ValueError(f"num_blurs must be a non-negative integer, got {num_blurs!r}")
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if isinstance(level_weights, (int, float)):
            weights = (float(level_weights),) * int(num_levels)
        else:
            weights = tuple(float(w) for w in level_weights)
            if len(weights) != num_levels:
                raise ValueError(
                    f"level_weights has {len(weights)} entries but num_levels={num_levels}"
                )
        self.spatial_dims = int(spatial_dims)
        self.num_levels = int(num_levels)
        self.level_weights = weights
        self.num_blurs = int(num_blurs)
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma)
        self.register_buffer(
            "kernel",
            _gaussian_kernel(self.spatial_dims, self.kernel_size, self.sigma),
            persistent=False,
        )

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, num_levels={self.num_levels}, "
            f"level_weights={self.level_weights}, num_blurs={self.num_blurs}, "
            f"kernel_size={self.kernel_size}, sigma={self.sigma}"
        )

    def _check_size(self, spatial: Sequence[int]) -> None:
        """Every blurred level needs more pixels per side than the reflect padding."""
        pad = self.kernel_size // 2
        if self.num_blurs == 0 or pad == 0:
            return
        size = list(spatial)
        for level in range(1, self.num_levels):  # levels 1 .. L-1 are blurred
            if min(size) <= pad:
                minimum = pad * 2 ** (self.num_levels - 2) + 1
                raise ValueError(
                    f"PyramidL1Loss: images of spatial size {tuple(spatial)} are too small for "
                    f"num_levels={self.num_levels}: level {level} is {tuple(size)}, but a "
                    f"{self.kernel_size}-wide Gaussian blur with reflect padding needs more than "
                    f"{pad} pixel(s) per side; use images of at least {minimum} pixels per side "
                    "or fewer levels"
                )
            size = [(n + 1) // 2 for n in size]

    def _blur(self, x: Tensor) -> Tensor:
        """``num_blurs`` depthwise Gaussian blurs with reflect padding."""
        channels = x.shape[1]
        weight = self.kernel.to(device=x.device, dtype=x.dtype).expand(
            channels, 1, *self.kernel.shape[2:]
        )
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        pad = [self.kernel_size // 2] * (2 * self.spatial_dims)
        for _ in range(self.num_blurs):
            x = conv(F.pad(x, pad, mode="reflect"), weight, groups=channels)
        return x

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Pyramid L1 loss of ``pred`` against ``target``.

        Args:
            pred: ``(B, C, *spatial)`` generated images.
            target: real images of the same shape.

        Returns:
            Scalar ``sum_l w_l * mean|pred_l - target_l|``.

        Raises:
            ValueError: on a shape mismatch, the wrong number of dimensions, or images too small
                for ``num_levels`` (the message gives the size).
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}"
            )
        if pred.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected (B, C, *spatial) with {self.spatial_dims} spatial dims, got shape "
                f"{tuple(pred.shape)}"
            )
        self._check_size(pred.shape[2:])
        every_second = (Ellipsis, *([slice(None, None, 2)] * self.spatial_dims))
        # Blur prediction and target together: one depthwise conv per blur for both.
        both = torch.cat([pred, target])
        batch = pred.shape[0]
        loss = pred.new_zeros(())
        for level, weight in enumerate(self.level_weights):
            if level > 0:
                both = self._blur(both)[every_second]
            loss = loss + weight * F.l1_loss(both[:batch], both[batch:])
        return loss
