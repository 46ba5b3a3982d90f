"""StyleGAN2 layers for 2D images and 3D volumes: equalised learning rate, modulated conv, noise.

* Equalised learning rate (Karras et al., 2018, "Progressive Growing of GANs", sec. 4.1): weights
  are stored as ``N(0, 1) / lr_multiplier`` and scaled at run time by
  ``lr_multiplier / sqrt(fan_in)``, so that Adam's per-parameter step sizes give every layer the
  same effective learning rate.
* Weight modulation / demodulation (Karras et al., 2020, "Analyzing and Improving the Image Quality
  of StyleGAN", sec. 2.2, eqs. 1-3), computed with one grouped convolution for the whole batch.
* Per-pixel noise inputs with a learned strength (Karras et al., 2019, "A Style-Based Generator
  Architecture for GANs", sec. 3.2).
* Minibatch standard deviation (Karras et al., 2018, sec. 3), StyleGAN2's discriminator epilogue.

MONAI and torch have no StyleGAN layers; these are written from the papers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import ActSpec, check_spatial_dims, get_act_layer
from medgen.nn.fir import Blur

__all__ = [
    "EqualConv",
    "EqualLinear",
    "MinibatchStdDev",
    "ModulatedConv",
    "NoiseInjection",
    "StyleConv",
    "stylegan_act",
]

_CONV = {2: F.conv2d, 3: F.conv3d}
_CONV_T = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ScaledLeakyReLU(nn.Module):
    """Leaky ReLU (slope 0.2) times ``sqrt(2)``, StyleGAN's activation with its variance gain."""

    def __init__(self, negative_slope: float = 0.2, gain: float = math.sqrt(2.0)) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope) * self.gain

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, gain={self.gain:.4f}"


def stylegan_act(activation: ActSpec) -> nn.Module:
    """StyleGAN's activation by name: ``"lrelu"`` (slope 0.2, gain ``sqrt(2)``), ``"linear"``,
    or any spec of :func:`~medgen.nn.factories.get_act_layer` (without a gain)."""
    if isinstance(activation, str) and activation.lower() == "lrelu":
        return _ScaledLeakyReLU()
    if isinstance(activation, str) and activation.lower() == "linear":
        return nn.Identity()
    return get_act_layer(activation)


class EqualLinear(nn.Module):
    """Fully connected layer with an equalised learning rate (Karras et al., 2018, sec. 4.1).

    The stored weight is ``N(0, 1) / lr_multiplier`` and the layer computes
    ``y = x @ (w * lr_multiplier / sqrt(in_features)).T + b * lr_multiplier``. The bias is stored as
    ``bias_init / lr_multiplier`` so that the effective initial bias is ``bias_init`` whatever the
    multiplier (StyleGAN's mapping network uses ``lr_multiplier=0.01``; the style affine of a
    modulated convolution uses ``bias_init=1`` so that styles start at 1).

    Args:
        in_features: Input features ``F_in``.
        out_features: Output features ``F_out``.
        bias: Learn an additive bias.
        bias_init: Effective initial value of the bias.
        lr_multiplier: Learning-rate multiplier of this layer's weight and bias.
        activation: ``None`` or ``"linear"`` for none; ``"lrelu"`` for StyleGAN's leaky ReLU
            (slope 0.2) with gain ``sqrt(2)``; any other spec accepted by
            :func:`~medgen.nn.factories.get_act_layer` (applied without a gain).

    Shapes:
        ``(*, F_in) -> (*, F_out)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: ActSpec = None,
    ) -> None:
        super().__init__()
        if lr_multiplier <= 0:
            raise ValueError(f"lr_multiplier must be positive, got {lr_multiplier}.")
        self.in_features = in_features
        self.out_features = out_features
        self.lr_multiplier = float(lr_multiplier)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = (
            nn.Parameter(torch.full((out_features,), float(bias_init) / lr_multiplier))
            if bias
            else None
        )
        self.weight_scale = self.lr_multiplier / math.sqrt(in_features)
        self.act = stylegan_act(activation)

    def effective_weight(self) -> Tensor:
        """The weight used at run time: ``stored * lr_multiplier / sqrt(in_features)``."""
        return self.weight * self.weight_scale

    def effective_bias(self) -> Tensor | None:
        """The bias used at run time: ``stored * lr_multiplier`` (``None`` without bias)."""
        return None if self.bias is None else self.bias * self.lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` of shape ``(*, F_in)`` to ``(*, F_out)``."""
        return self.act(F.linear(x, self.effective_weight(), self.effective_bias()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, lr_multiplier={self.lr_multiplier}"
        )


class EqualConv(nn.Module):
    """Convolution with an equalised learning rate (Karras et al., 2018, sec. 4.1), 2D or 3D.

    The stored weight is ``N(0, 1)``; the layer convolves with
    ``w / sqrt(in_channels * kernel_size ** spatial_dims)``. The bias starts at 0.

    With ``down=True`` the input is first low-pass filtered with a :class:`~medgen.nn.fir.Blur`
    (taps ``fir_taps``), then convolved with stride 2 (StyleGAN2's anti-aliased downsampling
    convolution, Karras et al., 2020, appendix B); ``stride`` and ``padding`` are then ignored and
    the output is ``spatial // 2``, each output centred between the inputs it summarises.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Cubic kernel size ``K``.
        stride: Convolution stride.
        padding: Zero padding, as for ``torch.nn.functional.conv{2,3}d`` (an int or ``"same"``).
        bias: Learn an additive bias.
        down: Blur, then convolve with stride 2 (halves the spatial size).
        fir_taps: 1D taps of the blur used with ``down``.

    Shapes:
        ``(B, C_in, *spatial) -> (B, C_out, *((spatial + 2 * padding - K) // stride + 1))``;
        ``(B, C_out, *(spatial // 2))`` with ``down``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = 0,
        bias: bool = True,
        down: bool = False,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.down = down
        self.blur: nn.Module = nn.Identity()
        if down:
            # Blur output n + p0 + p1 - k + 1, then a stride-2 K-conv gives n // 2 samples
            # (the padding of ModulatedConv's down path).
            total = len(fir_taps) + kernel_size - 3
            self.blur = Blur(self.spatial_dims, fir_taps, pad=((total + 1) // 2, total // 2))
            stride, padding = 2, 0
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(
            torch.randn(out_channels, in_channels, *(kernel_size,) * self.spatial_dims)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_scale = 1.0 / math.sqrt(in_channels * kernel_size**self.spatial_dims)

    def effective_weight(self) -> Tensor:
        """The weight used at run time: ``stored / sqrt(fan_in)``."""
        return self.weight * self.weight_scale

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` of shape ``(B, C_in, *spatial)``."""
        conv = _CONV[self.spatial_dims]
        return conv(
            self.blur(x),
            self.effective_weight(),
            self.bias,
            stride=self.stride,
            padding=self.padding,
        )

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}, down={self.down}"
        )


class ModulatedConv(nn.Module):
    """StyleGAN2 modulated (and demodulated) convolution, 2D or 3D, optionally up/downsampling.

    With ``s = affine(style)`` (an :class:`EqualLinear` whose bias starts at 1) and the equalised
    weight ``w`` of shape ``(C_out, C_in, *K)``, every sample ``b`` is convolved with its own weight
    (Karras et al., 2020, sec. 2.2)::

        w'[b, o, i, k] = s[b, i] * w[o, i, k]                           (eq. 1)
        w''[b, o, i, k] = w'[b, o, i, k] / sqrt(sum_{i,k} w'[b, o, i, k]^2 + eps)   (eqs. 2-3)

    Demodulation restores unit output variance for unit-variance, independent inputs; it replaces
    the instance normalisation (AdaIN) of StyleGAN. There is no bias: StyleGAN2 adds noise, then
    bias and activation, after this convolution.

    Two equivalent computations are offered:

    * ``fused_modconv=True`` (default): the batch is folded into the channels and one grouped
      convolution with ``groups=B`` applies every sample's weight (Karras et al., 2020, appendix B);
      best for small batches and inference.
    * ``fused_modconv=False``: scale the input by ``s``, convolve with the shared weight, scale the
      output by the demodulation coefficients. Same result, often faster when training with large
      batches because the convolution weights are shared.

    Resampling (StyleGAN2's choices, appendix B): ``up=True`` runs a stride-2 transposed convolution
    at the low resolution, then a :class:`~medgen.nn.fir.Blur` with gain ``2 ** spatial_dims``.
    This is cheaper than upsampling with :class:`~medgen.nn.fir.FIRUpsample` and convolving at the
    high resolution, which costs ``2 ** spatial_dims`` times more. ``down=True`` blurs
    (anti-aliases, Zhang, 2019), then runs a stride-2 convolution. The paddings centre the outputs
    on the same grid as :class:`~medgen.nn.fir.FIRUpsample` / :class:`~medgen.nn.fir.FIRDownsample`.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Cubic kernel size ``K`` (odd when neither ``up`` nor ``down``).
        style_dim: Dimension of the style (latent ``w``) vectors.
        demodulate: Apply eqs. 2-3 (``False`` for StyleGAN2's toRGB layers).
        up: Double the spatial size.
        down: Halve the spatial size.
        fir_taps: 1D taps of the resampling filter.
        eps: The ``epsilon`` of eq. 3.
        fused_modconv: Use the grouped-convolution computation (see above).

    Shapes:
        ``x``: ``(B, C_in, *spatial)``, ``style``: ``(B, style_dim)`` ->
        ``(B, C_out, *spatial)``, ``(B, C_out, *(2 * spatial))`` for ``up``,
        ``(B, C_out, *(spatial // 2))`` for ``down``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        up: bool = False,
        down: bool = False,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
        eps: float = 1e-8,
        fused_modconv: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if up and down:
            raise ValueError("ModulatedConv cannot both upsample and downsample (up and down).")
        if not (up or down) and kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd to keep the spatial size, got {kernel_size}; "
                "even kernels are only supported with up=True or down=True."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.style_dim = style_dim
        self.demodulate = demodulate
        self.up = up
        self.down = down
        self.eps = eps
        self.fused_modconv = fused_modconv
        d = self.spatial_dims
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *(kernel_size,) * d))
        self.weight_scale = 1.0 / math.sqrt(in_channels * kernel_size**d)
        self.affine = EqualLinear(style_dim, in_channels, bias_init=1.0)
        k = len(fir_taps)
        self.blur: nn.Module
        if up:
            # Transposed conv output: 2n - 2 + K; total blur pad k - K + 1 gives 2n samples,
            # with the split below centring output 2m on input position m - 1/4.
            total = k - kernel_size + 1
            p0 = (total + 1) // 2
            self.blur = Blur(d, fir_taps, pad=(p0, total - p0), upsample_factor=2)
        elif down:
            # Blur output n + k + K - 3 - k + 1, then a stride-2 K-conv gives n // 2 samples,
            # with output m centred on input position 2m + 1/2.
            total = k + kernel_size - 3
            p0 = (total + 1) // 2
            self.blur = Blur(d, fir_taps, pad=(p0, total - p0))
        else:
            self.blur = nn.Identity()

    def modulated_weight(self, style: Tensor) -> Tensor:
        """Per-sample weights of eqs. 1-3.

        Args:
            style: Style vectors of shape ``(B, style_dim)``.

        Returns:
            Weights of shape ``(B, C_out, C_in, *K)``, demodulated if ``demodulate``.
        """
        s = self.affine(style)  # (B, C_in)
        d = self.spatial_dims
        w = (self.weight * self.weight_scale).unsqueeze(0)
        w = w * s.reshape(s.shape[0], 1, -1, *(1,) * d)
        if self.demodulate:
            dcoefs = torch.rsqrt(w.square().sum(dim=list(range(2, d + 3))) + self.eps)
            w = w * dcoefs.reshape(*dcoefs.shape, 1, *(1,) * d)
        return w

    def _conv(self, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        """Convolve (and resample) with ``weight`` of shape ``(groups * C_out, C_in, *K)``."""
        d = self.spatial_dims
        if self.up:
            # conv_transpose weights are (in, out / groups, *K): swap the channel axes per group.
            w = weight.reshape(groups, self.out_channels, self.in_channels, *weight.shape[2:])
            w = w.transpose(1, 2).reshape(
                groups * self.in_channels, self.out_channels, *w.shape[3:]
            )
            return self.blur(_CONV_T[d](x, w, stride=2, groups=groups))
        if self.down:
            return _CONV[d](self.blur(x), weight, stride=2, groups=groups)
        return _CONV[d](x, weight, padding=self.kernel_size // 2, groups=groups)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        """Convolve ``x`` with weights modulated by ``style`` (eqs. 1-3).

        Args:
            x: Input of shape ``(B, C_in, *spatial)``.
            style: Style vectors of shape ``(B, style_dim)``.

        Returns:
            Tensor of shape ``(B, C_out, *spatial')`` (``spatial' = 2 * spatial`` for ``up``,
            ``spatial // 2`` for ``down``).
        """
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(
                f"ModulatedConv with spatial_dims={d} expects x of shape (B, C, *spatial) with "
                f"{d + 2} dims, got {tuple(x.shape)}."
            )
        batch = x.shape[0]
        if self.fused_modconv:
            w = self.modulated_weight(style)  # (B, C_out, C_in, *K)
            w = w.reshape(batch * self.out_channels, self.in_channels, *w.shape[3:])
            y = self._conv(x.reshape(1, batch * self.in_channels, *x.shape[2:]), w, groups=batch)
            return y.reshape(batch, self.out_channels, *y.shape[2:])
        # Unfused: (s * x) conv w, then scale each output channel by its demodulation coefficient.
        s = self.affine(style)  # (B, C_in)
        w = self.weight * self.weight_scale  # (C_out, C_in, *K)
        y = self._conv(x * s.reshape(batch, -1, *(1,) * d), w, groups=1)
        if self.demodulate:
            # sum_{i,k} (s_i w_oik)^2 = (s^2) @ (sum_k w_oik^2)^T
            wsq = w.square().sum(dim=list(range(2, d + 2)))  # (C_out, C_in)
            dcoefs = torch.rsqrt(s.square() @ wsq.t() + self.eps)  # (B, C_out)
            y = y * dcoefs.reshape(batch, -1, *(1,) * d)
        return y

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, style_dim={self.style_dim}, "
            f"demodulate={self.demodulate}, up={self.up}, down={self.down}, "
            f"fused_modconv={self.fused_modconv}"
        )


class NoiseInjection(nn.Module):
    """Add per-pixel Gaussian noise scaled by a learned strength (Karras et al., 2019, sec. 3.2).

    One scalar strength per layer, initialised to 0 so that a new layer is the identity (StyleGAN2's
    choice; StyleGAN used one strength per channel). The same noise image is broadcast over the
    channels.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.

    Shapes:
        ``x``: ``(B, C, *spatial)``, ``noise``: ``(B, 1, *spatial)`` -> ``(B, C, *spatial)``.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        x: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return ``x + weight * noise``.

        Args:
            x: Features of shape ``(B, C, *spatial)``.
            noise: Noise of shape ``(B, 1, *spatial)`` (anything broadcastable works); drawn from
                ``N(0, 1)`` when ``None``.
            generator: Random generator used when drawing the noise, for reproducible samples.

        Returns:
            Tensor of shape ``(B, C, *spatial)``.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"NoiseInjection with spatial_dims={self.spatial_dims} expects x of shape "
                f"(B, C, *spatial) with {self.spatial_dims + 2} dims, got {tuple(x.shape)}."
            )
        if noise is None:
            noise = torch.randn(
                (x.shape[0], 1, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype
            )
        return x + self.weight * noise

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}"


class StyleConv(nn.Module):
    """One StyleGAN2 synthesis layer: modulated convolution, noise, bias, activation.

    ``act(ModulatedConv(x, w) + strength * noise + b)`` with the leaky ReLU of gain ``sqrt(2)``
    (Karras et al., 2020, fig. 2c: the bias and noise are applied outside the style block, after
    the convolution). ``clamp`` bounds the output to ``[-clamp, clamp]`` (StyleGAN2-ADA clamps the
    activations of the layers run in reduced precision; ``None`` disables it).

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        style_dim: Dimension of the style vectors ``w``.
        kernel_size: Kernel size ``K`` (3 in StyleGAN2).
        up: Double the spatial size (transposed convolution + blur).
        fir_taps: 1D taps of the resampling filter.
        noise: Add per-pixel noise with a learned strength (:class:`NoiseInjection`).
        clamp: Optional bound of the output.
        fused_modconv: See :class:`ModulatedConv`.

    Shapes:
        ``x``: ``(B, C_in, *spatial)``, ``w``: ``(B, style_dim)`` -> ``(B, C_out, *spatial')``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        style_dim: int,
        kernel_size: int = 3,
        up: bool = False,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
        noise: bool = True,
        clamp: float | None = None,
        fused_modconv: bool = True,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size,
            style_dim,
            up=up,
            fir_taps=fir_taps,
            fused_modconv=fused_modconv,
        )
        self.noise = NoiseInjection(spatial_dims) if noise else None
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.act = _ScaledLeakyReLU()
        self.clamp = clamp
        self.spatial_dims = self.conv.spatial_dims

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Apply the layer; ``noise`` ``(B, 1, *spatial')`` is drawn if ``None`` (with
        ``generator``, or one generator per sample)."""
        y = self.conv(x, w)
        if self.noise is not None:
            if noise is None and generator is not None:
                # Drawn on the generator's device (the CPU for seeded sampling), then moved, so
                # a seed gives the same noise on every device; one generator per sample makes
                # the noise independent of how samples are batched.
                if isinstance(generator, torch.Generator):
                    shape = (y.shape[0], 1, *y.shape[2:])
                    noise = torch.randn(shape, generator=generator, device=generator.device)
                else:
                    shape = (1, 1, *y.shape[2:])
                    noise = torch.cat(
                        [torch.randn(shape, generator=g, device=g.device) for g in generator]
                    )
                noise = noise.to(y)
            y = self.noise(y, noise)
        y = self.act(y + self.bias.reshape(1, -1, *(1,) * self.spatial_dims))
        if self.clamp is not None:
            y = y.clamp(-self.clamp, self.clamp)
        return y


class MinibatchStdDev(nn.Module):
    """Append the minibatch standard deviation as extra channels (Karras et al., 2018, sec. 3).

    The batch is split into groups of ``group_size`` samples (the whole batch when it is smaller
    or not divisible; StyleGAN2 uses 4); within each group, the standard deviation of every
    feature over the group's samples is computed, averaged over the channels of each of
    ``num_channels`` channel slices and over the spatial positions, and appended to every sample
    of the group as a constant feature map. It lets the discriminator see the diversity of a batch,
    which counters mode collapse. The samples of a group are coupled, so per-sample gradient
    penalties are computed within groups (as in StyleGAN2).

    Args:
        group_size: Samples per group.
        num_channels: Number of channel slices (extra output channels).

    Shapes:
        ``(B, C, *spatial) -> (B, C + num_channels, *spatial)``.
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        """Append the group statistics to ``x`` of shape ``(B, C, *spatial)``."""
        batch, channels = x.shape[:2]
        spatial = x.shape[2:]
        if channels % self.num_channels:
            raise ValueError(
                f"MinibatchStdDev: {channels} channels are not divisible into "
                f"num_channels={self.num_channels} slices"
            )
        group = min(self.group_size, batch)
        if batch % group:
            group = batch
        y = x.reshape(group, batch // group, self.num_channels, channels // self.num_channels, -1)
        y = (y.float().var(dim=0, unbiased=False) + 1e-8).sqrt()  # (B/G, F, C/F, N)
        y = y.mean(dim=(2, 3)).to(x.dtype)  # (B/G, F)
        y = y.repeat(group, 1).reshape(batch, self.num_channels, *(1,) * len(spatial))
        return torch.cat([x, y.expand(batch, self.num_channels, *spatial)], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
