"""FIR filtering with resampling (``upfirdn``) and anti-aliased blur / up / down layers, 2D and 3D.

StyleGAN2 (Karras et al., 2020, "Analyzing and Improving the Image Quality of StyleGAN", sec. 2 and
appendix B) resamples feature maps with a separable binomial low-pass filter (taps ``[1, 3, 3, 1]``)
instead of nearest-neighbour or strided sampling; blurring before subsampling is what makes
convolutional networks shift-invariant again (Zhang, 2019, "Making convolutional networks
shift-invariant again"). Neither torch nor MONAI provides an ``upfirdn`` for 2D and 3D tensors, so
it is written here from those papers and the textbook definition (that of ``scipy.signal.upfirdn``),
with plain torch ops that ``torch.compile`` traces without graph breaks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import check_spatial_dims
from medgen.utils.sequences import per_axis

__all__ = ["Blur", "FIRDownsample", "FIRUpsample", "make_fir_kernel", "upfirdn"]

_CONV = {2: F.conv2d, 3: F.conv3d}
_CONV_T = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


def make_fir_kernel(
    taps: Sequence[float] | Tensor,
    spatial_dims: int,
    normalize: bool = True,
    gain: float = 1.0,
) -> Tensor:
    """Build a separable FIR kernel as the outer product of 1D taps.

    Args:
        taps: 1D filter taps, e.g. ``(1, 3, 3, 1)`` (binomial, as in StyleGAN2) or ``(1, 2, 1)``.
        spatial_dims: Number of spatial dimensions, 2 or 3.
        normalize: Scale the kernel to sum to 1 (unit DC gain).
        gain: Extra factor applied after normalisation, e.g. ``factor ** spatial_dims`` to keep
            the mean after zero-insertion upsampling by ``factor``.

    Returns:
        A float32 tensor of shape ``(k,) * spatial_dims`` with
        ``kernel[i, j(, l)] = taps[i] * taps[j] (* taps[l])`` (times the normalisation and gain).

    Raises:
        ValueError: For empty or non-1D taps, taps summing to 0 with ``normalize=True``, or an
            invalid ``spatial_dims``.
    """
    spatial_dims = check_spatial_dims(spatial_dims)
    t = torch.as_tensor(taps, dtype=torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"FIR taps must be a non-empty 1D sequence, got shape {tuple(t.shape)}.")
    kernel = t
    for _ in range(spatial_dims - 1):
        kernel = kernel[..., None] * t
    if normalize:
        total = kernel.sum()
        if total == 0:
            raise ValueError(f"Cannot normalise FIR taps {t.tolist()} that sum to 0.")
        kernel = kernel / total
    return kernel * gain


#: How the error messages of :func:`per_axis` name the ``pad`` argument.
_PAD = "pad pair (p0, p1)"


def _flat_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """Per-axis ``(before, after)`` pairs, first spatial axis first -> ``F.pad``'s flat order."""
    return [v for pair in reversed(pads) for v in pair]


def _upfirdn_nd(
    x: Tensor,
    kernel: Tensor,
    up: Sequence[int],
    down: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> Tensor:
    """``upfirdn`` with a full ``(k_1, ..., k_d)`` kernel and per-axis factors and pads."""
    d = x.ndim - 2
    channels = x.shape[1]
    ks = kernel.shape
    weight = kernel.to(device=x.device, dtype=x.dtype)
    if any(u > 1 for u in up):
        # Polyphase form: a strided transposed convolution *is* zero-insertion followed by a full
        # (true, unflipped) convolution, without multiplying the inserted zeros. The full output
        # starts k - 1 samples before the padded signal's first valid output, so shift by padding.
        weight = weight[None, None].expand(channels, 1, *ks)
        y = _CONV_T[d](x, weight, stride=tuple(up), groups=channels)
        crop = [(p0 - (k - 1), p1 + u - k) for (p0, p1), k, u in zip(pads, ks, up, strict=True)]
        y = F.pad(y, _flat_pad(crop))
        if any(s > 1 for s in down):
            index = (Ellipsis, *(slice(None, None, s) for s in down))
            y = y[index]
        return y
    # No upsampling: pad, then convolve with the flipped kernel (torch convolutions are
    # cross-correlations) and keep every `down`-th output through the stride.
    weight = weight.flip(list(range(d)))[None, None].expand(channels, 1, *ks)
    x = F.pad(x, _flat_pad(pads))
    return _CONV[d](x, weight, stride=tuple(down), groups=channels)


def upfirdn(
    x: Tensor,
    kernel: Tensor,
    up: int = 1,
    down: int = 1,
    pad: int | Sequence[int] = (0, 0),
) -> Tensor:
    """Upsample, FIR-filter and downsample every channel of ``x`` with the same kernel.

    Along each spatial axis of length ``n`` the input is (1) upsampled by inserting ``up - 1`` zeros
    after every sample (length ``n * up``), (2) padded with ``p0`` zeros before and ``p1`` after
    (negative values crop), (3) convolved (a true convolution, kernel flipped; "valid" mode) with
    ``kernel``, and (4) downsampled by keeping every ``down``-th sample starting at the first. This
    is ``scipy.signal.upfirdn`` with ``pad = (k - 1, k - up)``, and the resampling primitive of
    StyleGAN2 (Karras et al., 2020, appendix B).

    The filter is depthwise (one kernel for every channel). Upsampling runs in polyphase form as a
    strided transposed convolution and downsampling as a strided convolution, so no work is spent on
    inserted zeros or discarded outputs. There is no data-dependent control flow, so the function
    compiles with ``torch.compile(fullgraph=True)``.

    Args:
        x: Input of shape ``(B, C, *spatial)`` with 2 or 3 spatial dimensions.
        kernel: Either the full kernel of shape ``(k,) * spatial_dims`` (any ``(k_1, .., k_d)``
            works), e.g. from :func:`make_fir_kernel`, or 1D taps of shape ``(k,)`` applied
            separably along every axis (cheaper in 3D: ``3k`` instead of ``k**3`` taps per sample).
            Any normalisation or gain must already be in the kernel.
        up: Integer upsampling factor, the same for every spatial axis.
        down: Integer downsampling factor, the same for every spatial axis.
        pad: ``p`` or ``(p0, p1)``: zeros added before / after every spatial axis of the
            upsampled signal.

    Returns:
        Tensor of shape ``(B, C, *out)`` with ``out = (n * up + p0 + p1 - k) // down + 1`` per axis.

    Raises:
        ValueError: For a kernel whose dimensionality is neither 1 nor ``spatial_dims``, an input
            that is not 4D or 5D, or factors below 1.
    """
    d = x.ndim - 2
    if d not in (2, 3):
        raise ValueError(
            "upfirdn expects x of shape (B, C, *spatial) with 2 or 3 spatial dims, "
            f"got {tuple(x.shape)}."
        )
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got up={up}, down={down}.")
    p0, p1 = per_axis(pad, 2, _PAD)
    if kernel.ndim == d:
        return _upfirdn_nd(x, kernel, (up,) * d, (down,) * d, [(p0, p1)] * d)
    if kernel.ndim == 1:
        # Separable: one 1D pass per axis (a kernel of size 1 along the other axes).
        k = kernel.shape[0]
        for axis in range(d):
            shape = [1] * d
            shape[axis] = k
            ups = [1] * d
            downs = [1] * d
            pads = [(0, 0)] * d
            ups[axis], downs[axis], pads[axis] = up, down, (p0, p1)
            x = _upfirdn_nd(x, kernel.reshape(shape), ups, downs, pads)
        return x
    raise ValueError(
        f"kernel must be 1D (separable taps) or {d}D for a {d}D input, "
        f"got shape {tuple(kernel.shape)}."
    )


def _check_input(x: Tensor, spatial_dims: int, name: str) -> None:
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} with spatial_dims={spatial_dims} expects (B, C, *spatial) with "
            f"{spatial_dims + 2} dims, got shape {tuple(x.shape)}."
        )


class Blur(nn.Module):
    """Depthwise FIR low-pass filter (binomial ``[1, 3, 3, 1]`` by default).

    The blur of StyleGAN2 (Karras et al., 2020, appendix B): applied after a transposed
    convolution (with ``upsample_factor=2``, to filter the zero-stuffed signal) and before a
    strided convolution, which anti-aliases it (Zhang, 2019).

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        taps: 1D filter taps; the kernel is their normalised outer product.
        pad: ``p`` or ``(p0, p1)`` zeros before / after every spatial axis. ``None`` keeps the
            size: ``(k // 2, (k - 1) // 2)``.
        upsample_factor: The kernel is multiplied by ``upsample_factor ** spatial_dims``, the gain
            that restores the mean of a signal zero-stuffed by that factor.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *(spatial + p0 + p1 - k + 1))``; unchanged for ``pad=None``.
    """

    kernel: Tensor

    def __init__(
        self,
        spatial_dims: int,
        taps: Sequence[float] = (1, 3, 3, 1),
        pad: int | Sequence[int] | None = None,
        upsample_factor: int = 1,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        kernel = make_fir_kernel(taps, spatial_dims, gain=float(upsample_factor) ** spatial_dims)
        k = kernel.shape[0]
        self.pad = (k // 2, (k - 1) // 2) if pad is None else per_axis(pad, 2, _PAD)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Filter ``x`` of shape ``(B, C, *spatial)``."""
        _check_input(x, self.spatial_dims, type(self).__name__)
        return upfirdn(x, self.kernel, pad=self.pad)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, taps={self.kernel.shape[0]}, pad={self.pad}"


class FIRDownsample(nn.Module):
    """Anti-aliased downsampling: FIR blur, then keep every ``factor``-th sample.

    The downsampling filter of StyleGAN2 (Karras et al., 2020) and BlurPool (Zhang, 2019). With
    ``taps=(1, 1)`` it is average pooling. Padding ``((k - f + 1) // 2, (k - f) // 2)`` centres
    every output between the inputs it summarises.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        taps: 1D filter taps; the kernel is their normalised outer product.
        factor: Downsampling factor along every spatial axis.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *(spatial // factor))``.
    """

    kernel: Tensor

    def __init__(
        self, spatial_dims: int, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}.")
        self.factor = int(factor)
        kernel = make_fir_kernel(taps, spatial_dims)
        k = kernel.shape[0]
        self.pad = ((k - factor + 1) // 2, (k - factor) // 2)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample ``x`` of shape ``(B, C, *spatial)`` to ``(B, C, *(spatial // factor))``."""
        _check_input(x, self.spatial_dims, type(self).__name__)
        return upfirdn(x, self.kernel, down=self.factor, pad=self.pad)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, taps={self.kernel.shape[0]}, factor={self.factor}"
        )


class FIRUpsample(nn.Module):
    """FIR upsampling: insert ``factor - 1`` zeros after every sample, then blur.

    The upsampling filter of StyleGAN2 (Karras et al., 2020, appendix B). The kernel carries the
    gain ``factor ** spatial_dims`` so that the DC gain is 1 (a constant stays constant away from
    the borders), and the padding ``((k + f - 1) // 2, (k - f) // 2)`` puts every output at its
    pixel centre (for ``[1, 3, 3, 1]``, output ``2m`` weighs inputs ``m - 1`` and ``m`` by 1:3).
    With ``taps=(1, 1)`` it is nearest-neighbour upsampling.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        taps: 1D filter taps; the kernel is their normalised outer product.
        factor: Upsampling factor along every spatial axis.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *(factor * spatial))``.
    """

    kernel: Tensor

    def __init__(
        self, spatial_dims: int, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}.")
        self.factor = int(factor)
        kernel = make_fir_kernel(taps, spatial_dims, gain=float(factor) ** spatial_dims)
        k = kernel.shape[0]
        self.pad = ((k + factor - 1) // 2, (k - factor) // 2)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Upsample ``x`` of shape ``(B, C, *spatial)`` to ``(B, C, *(factor * spatial))``."""
        _check_input(x, self.spatial_dims, type(self).__name__)
        return upfirdn(x, self.kernel, up=self.factor, pad=self.pad)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, taps={self.kernel.shape[0]}, factor={self.factor}"
        )
