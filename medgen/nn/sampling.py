"""Resolution changes by a factor of two along every spatial dimension."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import avg_pool_nd, check_spatial_dims, conv_nd, conv_transpose_nd
from medgen.nn.fir import FIRDownsample, FIRUpsample

__all__ = ["Downsample", "Upsample"]


class Downsample(nn.Module):
    """Halve every spatial size.

    Modes:
        * ``"conv"``: 3x3 convolution with stride 2 and padding 1 (learned);
        * ``"avgpool"``: 2x2 average pooling, followed by a 1x1 convolution only if the channel
          count changes;
        * ``"fir"``: anti-aliased: a binomial FIR low-pass with subsampling
          (:class:`~medgen.nn.fir.FIRDownsample`, taps ``fir_taps``), then a 3x3 convolution at
          the low resolution (Zhang, 2019, "Making convolutional networks shift-invariant again";
          Karras et al., 2020, StyleGAN2).

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``; defaults to ``in_channels``.
        mode: ``"conv"``, ``"avgpool"`` or ``"fir"``.
        fir_taps: 1D taps of the FIR filter for ``mode="fir"``.

    Shapes:
        ``(B, C_in, *spatial) -> (B, C_out, *ceil(spatial / 2))`` for ``"conv"``,
        ``floor(spatial / 2)`` for ``"avgpool"`` and ``"fir"``; equal for even sizes.
    """

    MODES = ("conv", "avgpool", "fir")

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        mode: str = "conv",
        fir_taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        out_channels = in_channels if out_channels is None else out_channels
        if mode not in self.MODES:
            raise ValueError(f"Unknown Downsample mode {mode!r}; valid modes are {self.MODES}.")
        self.mode = mode
        self.in_channels = in_channels
        self.out_channels = out_channels
        if mode == "conv":
            self.op: nn.Module = conv_nd(spatial_dims)(
                in_channels, out_channels, 3, stride=2, padding=1
            )
        elif mode == "fir":
            self.op = nn.Sequential(
                FIRDownsample(spatial_dims, fir_taps),
                conv_nd(spatial_dims)(in_channels, out_channels, 3, padding=1),
            )
        else:
            proj: nn.Module = (
                conv_nd(spatial_dims)(in_channels, out_channels, 1)
                if in_channels != out_channels
                else nn.Identity()
            )
            self.op = nn.Sequential(avg_pool_nd(spatial_dims)(kernel_size=2, stride=2), proj)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample ``x`` of shape ``(B, C_in, *spatial)`` to ``(B, C_out, *spatial / 2)``."""
        return self.op(x)


class Upsample(nn.Module):
    """Double every spatial size.

    Modes:
        * ``"nearest_conv"``: nearest-neighbour interpolation by 2, then a 3x3 convolution
          (avoids the checkerboard artefacts of transposed convolutions; Odena et al., 2016);
        * ``"transpose"``: 4x4 transposed convolution with stride 2 and padding 1;
        * ``"fir"``: zero-insertion upsampling with a binomial FIR interpolation filter
          (:class:`~medgen.nn.fir.FIRUpsample`, taps ``fir_taps``), then a 3x3 convolution
          (Karras et al., 2020, StyleGAN2).

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``; defaults to ``in_channels``.
        mode: ``"nearest_conv"``, ``"transpose"`` or ``"fir"``.
        fir_taps: 1D taps of the FIR filter for ``mode="fir"``.

    Shapes:
        ``(B, C_in, *spatial) -> (B, C_out, *(2 * spatial))``.
    """

    MODES = ("nearest_conv", "transpose", "fir")

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        mode: str = "nearest_conv",
        fir_taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        out_channels = in_channels if out_channels is None else out_channels
        if mode not in self.MODES:
            raise ValueError(f"Unknown Upsample mode {mode!r}; valid modes are {self.MODES}.")
        self.mode = mode
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.fir: nn.Module | None = FIRUpsample(spatial_dims, fir_taps) if mode == "fir" else None
        if mode in ("nearest_conv", "fir"):
            self.conv: nn.Module = conv_nd(spatial_dims)(in_channels, out_channels, 3, padding=1)
        else:
            self.conv = conv_transpose_nd(spatial_dims)(
                in_channels, out_channels, 4, stride=2, padding=1
            )

    def forward(self, x: Tensor) -> Tensor:
        """Upsample ``x`` of shape ``(B, C_in, *spatial)`` to ``(B, C_out, *(2 * spatial))``."""
        if self.mode == "nearest_conv":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.fir is not None:
            x = self.fir(x)
        return self.conv(x)
