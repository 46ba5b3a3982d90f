"""StyleGAN2 generator and discriminator for 2D images and 3D volumes.

Written from the papers (the NVIDIA code is non-commercially licensed; none of it is copied):

* Karras et al., "A Style-Based Generator Architecture for GANs" (StyleGAN), CVPR 2019: the mapping
  network ``z -> w`` (8 fully connected layers, learning-rate multiplier 0.01, sec. 2 and
  appendix C), a learned constant input, per-layer noise, style mixing (sec. 3.1) and the
  truncation trick in ``W`` (sec. 3.3, eq. 3: ``w' = w_avg + psi * (w - w_avg)``).
* Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2), CVPR 2020:
  weight (de)modulation (sec. 2.2), the skip generator and residual discriminator (sec. 4.1,
  fig. 7, config E/F), FIR up/down-sampling (appendix B), minibatch standard deviation in the
  discriminator's last block.
* Karras et al., "Training Generative Adversarial Networks with Limited Data" (StyleGAN2-ADA),
  NeurIPS 2020: the channel widths ``min(channel_base / resolution, channel_max)`` and the
  projection discriminator for class conditioning (Miyato & Koyama, "cGANs with Projection
  Discriminator", ICLR 2018).

Parameter count: at 256² RGB with ``latent_dim = w_dim = 512``, ``channel_base = 32768``,
``channel_max = 512`` and 8 mapping layers (the "stylegan2" configuration of StyleGAN2-ADA, config
F's widths at 256²), :class:`StyleGAN2Generator` has 30,034,338 parameters and
:class:`StyleGAN2Discriminator` 28,864,129: the sums of the per-layer counts printed by the
official StyleGAN2-ADA implementation for that configuration (quoted in its issue tracker,
NVlabs/stylegan2-ada-pytorch #181/#182: e.g. ``mapping.fc0 262656``, ``synthesis.b64.conv0
2622465``, ``synthesis.b256.torgb 66051``, ``b256.conv1 295168``). ``tests/test_stylegan2_nets.py``
checks both.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medgen.nn.factories import check_spatial_dims
from medgen.nn.fir import FIRUpsample
from medgen.nn.stylegan import (
    EqualConv,
    EqualLinear,
    MinibatchStdDev,
    ModulatedConv,
    StyleConv,
    stylegan_act,
)

__all__ = [
    "MappingNetwork",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "SynthesisNetwork",
    "normalize_2nd_moment",
    "stylegan2_channels",
]


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """``x / sqrt(mean(x ** 2) + eps)`` along ``dim`` (StyleGAN's input normalisation)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def stylegan2_channels(resolution: int, channel_base: int, channel_max: int) -> int:
    """Channels at ``resolution``: ``min(channel_base // resolution, channel_max)`` (ADA's rule)."""
    return max(1, min(channel_base // resolution, channel_max))


def _base_shape(image_size: int | Sequence[int], spatial_dims: int, owner: str):
    """``(sizes, base, num_blocks)``: the image size per axis, the size of the first (4-pixel)
    block per axis, and the number of resolutions from the base to the image size."""
    if isinstance(image_size, int):
        sizes = (operator.index(image_size),) * spatial_dims
    else:
        sizes = tuple(operator.index(s) for s in image_size)
    if len(sizes) != spatial_dims:
        raise ValueError(f"{owner}: image_size {image_size!r} needs {spatial_dims} axes")
    smallest = min(sizes)
    if smallest < 4 or smallest & (smallest - 1):
        raise ValueError(
            f"{owner}: the smallest side of image_size {sizes} must be a power of 2 >= 4 "
            "(the nets double / halve it from a 4-pixel base)"
        )
    num_blocks = int(math.log2(smallest)) - 1  # 4, 8, ..., smallest
    factor = 2 ** (num_blocks - 1)
    if any(s % factor for s in sizes):
        raise ValueError(
            f"{owner}: every side of image_size {sizes} must be a multiple of {factor}"
        )
    return sizes, tuple(s // factor for s in sizes), num_blocks


class MappingNetwork(nn.Module):
    """StyleGAN's mapping network ``f: (z, c) -> w`` (Karras et al., 2019, sec. 2).

    ``z`` is normalised to unit second moment; a class label ``c`` (one-hot or soft, ``(B,
    num_classes)``) is embedded by a linear layer, normalised the same way and concatenated. Then
    ``num_layers`` equalised fully connected layers with leaky ReLU and learning-rate multiplier
    ``lr_multiplier`` (0.01: the mapping learns 100 times slower). The moving average of ``w``
    (buffer ``w_avg``, decay ``w_avg_beta``) is the centre of the truncation trick.

    Args:
        latent_dim: Dimension of ``z`` (0 for a label-only mapping, e.g. the projection
            discriminator's).
        num_classes: Number of classes of ``c`` (0 = unconditional).
        w_dim: Dimension of ``w``.
        num_layers: Fully connected layers (8 in StyleGAN).
        lr_multiplier: Learning-rate multiplier of the layers.
        hidden_dim: Width of the hidden layers (default ``w_dim``).
        w_avg_beta: Decay of the ``w`` moving average, updated with ``update_w_avg=True``.

    Shapes:
        ``z``: ``(B, latent_dim)``, ``c``: ``(B, num_classes)`` -> ``(B, w_dim)``.
    """

    w_avg: Tensor

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        w_dim: int,
        num_layers: int = 8,
        lr_multiplier: float = 0.01,
        hidden_dim: int | None = None,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        if latent_dim <= 0 and num_classes <= 0:
            raise ValueError("MappingNetwork needs latent_dim > 0 or num_classes > 0")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.w_dim = w_dim
        self.w_avg_beta = w_avg_beta
        embed = w_dim if num_classes else 0
        self.embed = EqualLinear(num_classes, embed) if num_classes else None
        hidden = hidden_dim or w_dim
        features = [latent_dim + embed] + [hidden] * (num_layers - 1) + [w_dim]
        self.layers = nn.Sequential(
            *(
                EqualLinear(a, b, lr_multiplier=lr_multiplier, activation="lrelu")
                for a, b in zip(features[:-1], features[1:], strict=True)
            )
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: Tensor | None,
        c: Tensor | None = None,
        truncation_psi: float = 1.0,
        update_w_avg: bool = False,
    ) -> Tensor:
        """Map ``z`` (and ``c``) to ``w``; truncate towards ``w_avg`` when ``truncation_psi < 1``."""
        parts = []
        if self.latent_dim:
            if z is None or z.ndim != 2 or z.shape[1] != self.latent_dim:
                got = None if z is None else tuple(z.shape)
                raise ValueError(f"z must have shape (B, {self.latent_dim}), got {got}")
            parts.append(normalize_2nd_moment(z))
        if self.embed is not None:
            if c is None or c.ndim != 2 or c.shape[1] != self.num_classes:
                got = None if c is None else tuple(c.shape)
                raise ValueError(
                    f"this mapping is class-conditional: c must have shape (B, "
                    f"{self.num_classes}) (one-hot labels), got {got}"
                )
            parts.append(normalize_2nd_moment(self.embed(c.to(self.embed.weight.dtype))))
        w = self.layers(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w


class _ToImage(nn.Module):
    """StyleGAN2's toRGB: a modulated 1x1 convolution without demodulation, plus a bias."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv(
            spatial_dims, in_channels, out_channels, 1, w_dim, demodulate=False
        )
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.spatial_dims = spatial_dims

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias.reshape(1, -1, *(1,) * self.spatial_dims)


class _SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (up-)conv, conv, toRGB, plus the upsampled image."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        image_channels: int,
        base_shape: Sequence[int] | None,
        fir_taps: Sequence[float],
        clamp: float | None,
        fused_modconv: bool,
    ) -> None:
        super().__init__()
        kw = {"fir_taps": fir_taps, "clamp": clamp, "fused_modconv": fused_modconv}
        self.const = (
            nn.Parameter(torch.randn(out_channels, *base_shape)) if base_shape is not None else None
        )
        self.conv0 = (
            None
            if base_shape is not None
            else StyleConv(spatial_dims, in_channels, out_channels, w_dim, up=True, **kw)
        )
        self.conv1 = StyleConv(spatial_dims, out_channels, out_channels, w_dim, **kw)
        self.to_image = _ToImage(spatial_dims, out_channels, image_channels, w_dim)
        self.upsample = FIRUpsample(spatial_dims, fir_taps) if base_shape is None else None
        self.num_convs = 1 if base_shape is not None else 2

    def forward(
        self,
        x: Tensor | None,
        image: Tensor | None,
        ws: Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``ws``: ``(B, num_convs + 1, w_dim)``; returns the features and the image so far."""
        if self.const is not None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], *self.const.shape).to(ws.dtype)
        else:
            x = self.conv0(x, ws[:, 0], generator=generator)
        x = self.conv1(x, ws[:, self.num_convs - 1], generator=generator)
        y = self.to_image(x, ws[:, self.num_convs]).float()
        image = y if image is None else self.upsample(image) + y
        return x, image


class SynthesisNetwork(nn.Module):
    """StyleGAN2's skip synthesis network ``g: ws -> image`` (Karras et al., 2020, fig. 7b).

    From a learned constant of shape ``(C, 4, 4[, 4])``, every block doubles the resolution with a
    modulated up-convolution and a modulated convolution (each followed by noise, bias and leaky
    ReLU), and adds its toRGB output to the FIR-upsampled image of the block below.

    Layer ``i`` reads ``ws[:, i]``; the toRGB of a block reads the ``w`` of the next block's first
    convolution (``num_ws = number of convolutions + 1``).

    Args:
        spatial_dims: 2 or 3.
        image_size: Output size (int or per axis); the smallest side a power of 2 >= 4.
        out_channels: Image channels.
        w_dim: Dimension of ``w``.
        channel_base: Channels at resolution ``r`` are ``min(channel_base // r, channel_max)``.
        channel_max: Channel cap.
        fir_taps: Resampling filter taps.
        clamp: Optional activation clamp of every layer.
        fused_modconv: See :class:`~medgen.nn.stylegan.ModulatedConv`.
        gradient_checkpointing: Recompute every block in the backward pass (training).

    Shapes:
        ``ws``: ``(B, num_ws, w_dim)`` -> ``(B, out_channels, *image_size)`` (float32).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: int | Sequence[int],
        out_channels: int,
        w_dim: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
        clamp: float | None = None,
        fused_modconv: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        sizes, base, num_blocks = _base_shape(image_size, spatial_dims, "SynthesisNetwork")
        self.image_size = sizes
        self.w_dim = w_dim
        self.gradient_checkpointing = gradient_checkpointing
        blocks = []
        in_channels = 0
        for i in range(num_blocks):
            res = 4 * 2**i
            ch = stylegan2_channels(res, channel_base, channel_max)
            blocks.append(
                _SynthesisBlock(
                    spatial_dims,
                    in_channels,
                    ch,
                    w_dim,
                    out_channels,
                    base if i == 0 else None,
                    fir_taps,
                    clamp,
                    fused_modconv,
                )
            )
            in_channels = ch
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(b.num_convs for b in blocks) + 1

    def forward(
        self, ws: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> Tensor:
        """Synthesise images from ``ws`` ``(B, num_ws, w_dim)``.

        ``generator`` (one, or one per sample) draws the noise inputs; ``None`` uses the global
        random state.
        """
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(
                f"ws must have shape (B, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}"
            )
        x = image = None
        start = 0
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            block_ws = ws[:, start : start + block.num_convs + 1]
            if use_ckpt and generator is None:
                x, image = checkpoint(block, x, image, block_ws, use_reentrant=False)
            else:
                x, image = block(x, image, block_ws, generator)
            start += block.num_convs
        return image


class StyleGAN2Generator(nn.Module):
    """StyleGAN2 generator ``G(z, c) = g(f(z, c))``, 2D or 3D.

    Mapping network (:class:`MappingNetwork`) and skip synthesis network
    (:class:`SynthesisNetwork`); see the module docstring for the papers and the parameter count.

    Args:
        spatial_dims: 2 or 3.
        image_size: Output size (int or per axis); the smallest side a power of 2 >= 4.
        out_channels: Image channels.
        latent_dim: Dimension of ``z``.
        w_dim: Dimension of ``w`` (default ``latent_dim``).
        num_classes: Classes of the optional label ``c`` (0 = unconditional).
        mapping_layers: Layers of the mapping network (8).
        mapping_lr_multiplier: Learning-rate multiplier of the mapping network (0.01).
        channel_base: Channels at resolution ``r`` are ``min(channel_base // r, channel_max)``.
        channel_max: Channel cap.
        w_avg_beta: Decay of the moving average of ``w`` (truncation centre).
        fir_taps: Resampling filter taps.
        clamp: Optional activation clamp of the synthesis layers.
        fused_modconv: See :class:`~medgen.nn.stylegan.ModulatedConv`. Off by default: the
            grouped convolutions of the fused form measured 10-20x slower on a CPU for a training
            batch of 16 at 64² (the shared-weight form scales the activations instead).
        gradient_checkpointing: Recompute every synthesis block in the backward pass.

    Shapes:
        ``z``: ``(B, latent_dim)`` (``c``: ``(B, num_classes)``) -> ``(B, out_channels,
        *image_size)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: int | Sequence[int] = 64,
        out_channels: int = 1,
        latent_dim: int = 512,
        w_dim: int | None = None,
        num_classes: int = 0,
        mapping_layers: int = 8,
        mapping_lr_multiplier: float = 0.01,
        channel_base: int = 32768,
        channel_max: int = 512,
        w_avg_beta: float = 0.995,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
        clamp: float | None = None,
        fused_modconv: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.latent_dim = latent_dim
        self.w_dim = w_dim or latent_dim
        self.num_classes = num_classes
        self.out_channels = out_channels
        self.mapping = MappingNetwork(
            latent_dim,
            num_classes,
            self.w_dim,
            mapping_layers,
            mapping_lr_multiplier,
            w_avg_beta=w_avg_beta,
        )
        self.synthesis = SynthesisNetwork(
            spatial_dims,
            image_size,
            out_channels,
            self.w_dim,
            channel_base,
            channel_max,
            fir_taps,
            clamp,
            fused_modconv,
            gradient_checkpointing,
        )
        self.image_size = self.synthesis.image_size
        self.num_ws = self.synthesis.num_ws

    def map(
        self,
        z: Tensor,
        c: Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_w_avg: bool = False,
    ) -> Tensor:
        """``ws`` ``(B, num_ws, w_dim)``: ``f(z, c)`` broadcast to every layer, truncated.

        Truncation (StyleGAN eq. 3) applies to the first ``truncation_cutoff`` layers (all when
        ``None``).
        """
        w = self.mapping(z, c, update_w_avg=update_w_avg)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1.0:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            avg = self.mapping.w_avg.to(ws.dtype)
            ws[:, :cutoff] = avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws

    def forward(
        self,
        z: Tensor,
        c: Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Generate images from ``z`` (``generator``, one or one per sample, draws the noise)."""
        return self.synthesis(self.map(z, c, truncation_psi, truncation_cutoff), generator)


class _DiscriminatorBlock(nn.Module):
    """Residual block (Karras et al., 2020, fig. 7c): two 3x3 convs, the second downsampling,
    plus a 1x1 downsampling skip; the sum is scaled by ``sqrt(1/2)``."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, fir_taps: Sequence[float]
    ) -> None:
        super().__init__()
        d = spatial_dims
        self.conv0 = EqualConv(d, in_channels, in_channels, 3, padding=1)
        self.conv1 = EqualConv(d, in_channels, out_channels, 3, down=True, fir_taps=fir_taps)
        self.skip = EqualConv(
            d, in_channels, out_channels, 1, bias=False, down=True, fir_taps=fir_taps
        )
        self.act = stylegan_act("lrelu")

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.conv1(self.act(self.conv0(x))))
        return (self.skip(x) + y) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """StyleGAN2's residual discriminator, 2D or 3D, with an optional projection on class labels.

    fromRGB (1x1 conv) at the image resolution, one residual block per resolution down to 4 px,
    then minibatch standard deviation, a 3x3 conv, a fully connected layer and the output layer.
    With ``num_classes > 0`` the output is the projection ``<phi(x), psi(c)> / sqrt(cmap_dim)``
    of the features on a mapping of the label (Miyato & Koyama, 2018; StyleGAN2-ADA).

    Blocks are numbered from the input side (:attr:`blocks`); FreezeD (Mo et al., "Freeze the
    Discriminator", 2020) freezes ``from_image`` and the first blocks.

    Args:
        spatial_dims: 2 or 3.
        image_size: Input size (int or per axis); the smallest side a power of 2 >= 4.
        in_channels: Image channels.
        num_classes: Classes of the optional label ``c`` (0 = unconditional).
        channel_base: Channels at resolution ``r`` are ``min(channel_base // r, channel_max)``.
        channel_max: Channel cap.
        cmap_dim: Dimension of the label projection (default: the last block's channels).
        mbstd_group_size: Group size of the minibatch standard deviation.
        mbstd_num_channels: Channels it appends.
        fir_taps: Downsampling filter taps.
        gradient_checkpointing: Recompute every block in the backward pass (training).

    Shapes:
        ``x``: ``(B, in_channels, *image_size)`` (``c``: ``(B, num_classes)``) -> ``(B, 1)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: int | Sequence[int] = 64,
        in_channels: int = 1,
        num_classes: int = 0,
        channel_base: int = 32768,
        channel_max: int = 512,
        cmap_dim: int | None = None,
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        sizes, base, num_blocks = _base_shape(image_size, spatial_dims, "StyleGAN2Discriminator")
        self.image_size = sizes
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        resolutions = [4 * 2**i for i in reversed(range(num_blocks))]  # image res ... 4
        channels = [stylegan2_channels(r, channel_base, channel_max) for r in resolutions]
        self.from_image = nn.Sequential(
            EqualConv(d, in_channels, channels[0], 1), stylegan_act("lrelu")
        )
        self.blocks = nn.ModuleList(
            _DiscriminatorBlock(d, a, b, fir_taps)
            for a, b in zip(channels[:-1], channels[1:], strict=True)
        )
        top = channels[-1]
        self.mbstd = MinibatchStdDev(mbstd_group_size, mbstd_num_channels)
        self.conv = nn.Sequential(
            EqualConv(d, top + mbstd_num_channels, top, 3, padding=1), stylegan_act("lrelu")
        )
        self.fc = EqualLinear(top * math.prod(base), top, activation="lrelu")
        self.cmap_dim = (cmap_dim or top) if num_classes else 0
        self.out = EqualLinear(top, self.cmap_dim or 1)
        self.label_mapping = (
            MappingNetwork(0, num_classes, self.cmap_dim, lr_multiplier=0.01)
            if num_classes
            else None
        )

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Logits ``(B, 1)`` for images ``x`` (and labels ``c`` when conditional)."""
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[1:]) != (
            self.in_channels,
            *self.image_size,
        ):
            raise ValueError(
                f"StyleGAN2Discriminator expects (B, {self.in_channels}, *{self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.from_image(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        x = self.fc(self.conv(self.mbstd(x)).flatten(1))
        out = self.out(x)
        if self.label_mapping is None:
            return out
        if c is None:
            raise ValueError(
                f"this discriminator is class-conditional: pass c (B, {self.num_classes})"
            )
        cmap = self.label_mapping(None, c)
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)

    def freeze(self, num_blocks: int) -> list[nn.Parameter]:
        """FreezeD: stop the gradient of ``from_image`` and the first ``num_blocks`` blocks.

        Returns:
            The frozen parameters (``requires_grad`` set to False).
        """
        if not 0 <= num_blocks <= len(self.blocks):
            raise ValueError(
                f"freeze_d={num_blocks}: this discriminator has {len(self.blocks)} blocks "
                f"(0 to {len(self.blocks)} can be frozen)"
            )
        frozen: list[nn.Parameter] = []
        if num_blocks:
            for module in [self.from_image, *self.blocks[:num_blocks]]:
                for p in module.parameters():
                    p.requires_grad_(False)
                    frozen.append(p)
        return frozen
