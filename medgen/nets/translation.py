"""Image-to-image translation nets: ResNet and UNet generators, PatchGAN and pixel discriminators.

These follow the reference behaviour of pix2pix / CycleGAN (Isola et al., CVPR 2017; Zhu et al.,
ICCV 2017; junyanz/pytorch-CycleGAN-and-pix2pix), written from its documented facts, with the
additions the medical presets need:

* every net takes ``spatial_dims`` (2 or 3) first, so one class serves images and volumes;
* :class:`ResnetGenerator` can upsample by nearest-resize then convolution and add a global residual,
  as COMI (Zhang et al., CSBJ 2022) does for out-of-focus correction;
* norms are given by name or ``(name, kwargs)`` through :func:`medgen.nn.factories.get_norm_layer`.
  ``"instance"`` means instance norm *without* affine parameters, as upstream; convolutions carry a
  bias only when the norm that follows has no shift of its own (instance without affine, or none),
  so ``"batch"`` convs have no bias, as upstream;
* every net takes ``gradient_checkpointing`` (also settable after construction): in training with
  grad enabled, each stage (a residual block, a down or up stage, a discriminator conv stage) is
  recomputed in the backward pass instead of keeping its activations. Outputs, gradients and the
  running statistics of batch norm are the same as without it (see
  :func:`medgen.nn.checkpointing.checkpoint_stage`).

Presets: ``resnet_9blocks`` = ``ResnetGenerator(n_blocks=9)``, ``resnet_6blocks`` = ``n_blocks=6``,
``unet_256`` = ``UnetGenerator(num_downs=8)``, ``unet_128`` = ``num_downs=7``, ``basic`` =
``NLayerDiscriminator(n_layers=3)`` (the 70x70 PatchGAN), ``pixel`` = :class:`PixelDiscriminator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from medgen.nn.checkpointing import (
    BufferSnapshot,
    RestoreRunningStats,
    StagedCheckpointMixin,
    apply_layers,
    checkpoint_stage,
    stages_from_starts,
    tracked_stat_buffers,
)
from medgen.nn.factories import (
    NormSpec,
    check_spatial_dims,
    conv_nd,
    conv_transpose_nd,
    get_act_layer,
    get_norm_layer,
)
from medgen.nn.layerwise import NORMS, Stage, check_norm, conv_halo

__all__ = [
    "INIT_TYPES",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "UnetGenerator",
    "UnetSkipBlock",
    "init_weights",
    "patchgan_layers",
    "receptive_field",
]

# Old private names of the checkpointing helpers, now public in medgen.nn.checkpointing; kept so
# that code importing them from here keeps working (medgen.models.translation, until it moves).
_tracked_stat_buffers = tracked_stat_buffers
_BufferSnapshot = BufferSnapshot
_RestoreRunningStats = RestoreRunningStats
_apply_layers = apply_layers
_checkpoint_stage = checkpoint_stage
_StagedCheckpointMixin = StagedCheckpointMixin
_stages_from_starts = stages_from_starts

_PADDING_MODES = {"reflect": "reflect", "replicate": "replicate", "zero": "zeros", "zeros": "zeros"}
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _norm(norm: NormSpec, spatial_dims: int, channels: int) -> nn.Module:
    """A norm layer; ``"instance"`` without affine parameters unless ``norm`` says otherwise.

    Upstream pix2pix/CycleGAN uses non-affine instance norm; our factory defaults to affine, so the
    translation nets ask for ``affine=False`` unless the caller says otherwise.
    """
    return get_norm_layer(norm, spatial_dims, channels, instance_affine=False)


def _conv_bias(norm: NormSpec, spatial_dims: int, conv_bias: bool | None = None) -> bool:
    """Whether a convolution followed by ``norm`` has its own bias.

    ``conv_bias=None`` decides by the norm: a bias is redundant before a norm with a learned shift
    (batch, group, affine instance); it is kept before an identity or a non-affine instance norm.
    ``True``/``False`` force it. Upstream pix2pix/CycleGAN gives these convolutions a bias only
    before instance norm, so its ``norm=none`` nets have none: ``conv_bias=False`` builds those.
    """
    if conv_bias is not None:
        return bool(conv_bias)
    layer = _norm(norm, spatial_dims, 8)
    return getattr(layer, "bias", None) is None


def _padding_mode(padding_type: str) -> str:
    try:
        return _PADDING_MODES[padding_type]
    except KeyError:
        raise ValueError(
            f"Unknown padding_type {padding_type!r}; valid are 'reflect', 'replicate', 'zero'."
        ) from None


# --------------------------------------------------------------------------------------------------
# ResNet generator
# --------------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """Residual block ``x + norm(conv3(drop(relu(norm(conv3(x))))))`` with same-size padding.

    Args:
        spatial_dims: 2 or 3.
        channels: Number of input and output channels.
        norm: Normalisation (name or ``(name, kwargs)``); ``"instance"`` is non-affine.
        use_dropout: Dropout 0.5 between the two convolutions.
        padding_type: ``"reflect"``, ``"replicate"`` or ``"zero"``.
        bias: Whether the convolutions have a bias.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        norm: NormSpec = "instance",
        use_dropout: bool = False,
        padding_type: str = "reflect",
        bias: bool = True,
    ) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        mode = _padding_mode(padding_type)
        layers: list[nn.Module] = [
            conv(channels, channels, 3, padding=1, padding_mode=mode, bias=bias),
            _norm(norm, spatial_dims, channels),
            nn.ReLU(inplace=True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [
            conv(channels, channels, 3, padding=1, padding_mode=mode, bias=bias),
            _norm(norm, spatial_dims, channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, *spatial)`` to ``(B, C, *spatial)``."""
        return x + self.block(x)

    def stages(self, name: str = "block") -> list[Stage]:
        """Three stages (see :mod:`medgen.nn.layerwise`): the first convolution; norm, ReLU,
        (dropout) and the second convolution; the second norm plus the shortcut."""
        layers = list(self.block)
        conv_a, norm_a, act, conv_b, norm_b = (*layers[:3], *layers[-2:])
        second: nn.Module = nn.Sequential(*layers[3:-1])  # (dropout,) conv_b
        return [
            Stage(conv_a, conv_halo(conv_a), name=f"{name}.conv1"),
            Stage(
                second,
                conv_halo(conv_b),
                norm=check_norm(norm_a, name),
                act=act,
                name=f"{name}.conv2",
            ),
            Stage(
                nn.Identity(),
                0,
                norm=check_norm(norm_b, name),
                skip=nn.Identity(),
                skip_back=2,
                name=f"{name}.add",
            ),
        ]


#: Pointwise activations a generator's layers may use between stages.
_ACTS = (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Tanh, nn.Sigmoid)


def _chain_stages(layers: Sequence[nn.Module], prefix: str) -> list[Stage]:
    """Stages of a plain ``conv → norm → act → ...`` chain with residual blocks in it.

    Each norm and activation is applied by the stage that reads its output (so the norm sees the
    whole tensor's statistics); a residual block's input is written out normalised first.
    Returns the stages and leaves the trailing norm/act, if any, as a last pointwise stage.
    """
    stages: list[Stage] = []
    norm: nn.Module | None = None
    act: nn.Module | None = None

    def flush(name: str) -> None:
        nonlocal norm, act
        if norm is not None or act is not None:
            stages.append(Stage(nn.Identity(), 0, norm=norm, act=act, name=name))
            norm = act = None

    i = 0
    while i < len(layers):
        layer, name = layers[i], f"{prefix}.{i}"
        if isinstance(layer, ResnetBlock):
            flush(f"{name}.input")
            stages += layer.stages(name)
        elif isinstance(layer, nn.Identity):
            pass
        elif isinstance(layer, NORMS):
            if norm is not None or act is not None:
                flush(f"{name}.before")
            norm = layer
        elif isinstance(layer, _ACTS):
            if act is not None:
                flush(f"{name}.before")
            act = layer
        elif isinstance(layer, nn.Upsample):
            conv = layers[i + 1] if i + 1 < len(layers) else None
            if layer.mode != "nearest" or layer.scale_factor not in (2, 2.0) or conv is None:
                raise ValueError(f"{name}: only a nearest x2 upsampling before a convolution")
            stages.append(
                Stage(
                    nn.Sequential(layer, conv),
                    1 + conv_halo(conv),
                    Fraction(2),
                    norm,
                    act,
                    name=name,
                )
            )
            norm = act = None
            i += 1
        elif isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            stride = max(layer.stride)
            if stride not in (1, 2) or len(set(layer.stride)) != 1:
                raise ValueError(f"{name}: only stride 1 or 2 convolutions are supported")
            transposed = isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d))
            scale = Fraction(1) if stride == 1 else Fraction(2) if transposed else Fraction(1, 2)
            stages.append(Stage(layer, conv_halo(layer), scale, norm, act, name=name))
            norm = act = None
        else:
            raise ValueError(f"{name}: {type(layer).__name__} has no layer-by-layer form")
        i += 1
    flush(f"{prefix}.out")
    return stages


class ResnetGenerator(StagedCheckpointMixin):
    """ResNet generator of CycleGAN/pix2pix (``resnet_9blocks``, ``resnet_6blocks``), 2D or 3D.

    Layout: padded 7-conv to ``ngf``; two stride-2 3-convs (``ngf -> 2 ngf -> 4 ngf``); ``n_blocks``
    residual blocks at ``4 ngf``; two x2 upsamplings back to ``ngf``; padded 7-conv to
    ``out_channels``; optional global residual; final activation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        ngf: Width of the first layer.
        n_blocks: Number of residual blocks (9 or 6 upstream).
        norm: ``"instance"`` (non-affine, the default), ``"batch"``, ``"none"``, ... or
            ``(name, kwargs)``.
        use_dropout: Dropout 0.5 inside each residual block.
        padding_type: ``"reflect"`` (default), ``"replicate"`` or ``"zero"``; used for the 7-convs,
            the residual blocks and resize-conv upsampling.
        upsample: ``"transpose"`` (3-kernel stride-2 transposed conv, upstream) or ``"resize_conv"``
            (nearest x2 then a 3-conv, as COMI; avoids checkerboard artefacts).
        global_residual: Add the input to the output before the final activation (COMI). Needs
            ``in_channels == out_channels``.
        final_act: ``"tanh"`` (default), ``None`` or any :func:`get_act_layer` spec.
        conv_bias: Whether the convolutions followed by a norm have a bias: ``None`` (default)
            decides by the norm (none before batch norm, one before non-affine instance norm or
            no norm); ``False`` with ``norm="none"`` builds upstream pix2pix/CycleGAN's
            ``norm=none`` nets, whose convolutions have no bias.
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only), stage by stage: the 7-conv stem, each
            downsampling, each residual block and each upsampling. Outputs, gradients and batch
            norm running statistics are unchanged. Can be toggled later through the attribute of
            the same name.

    Input ``(B, in_channels, *spatial)`` with each spatial size divisible by 4; output
    ``(B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: NormSpec = "instance",
        use_dropout: bool = False,
        padding_type: str = "reflect",
        upsample: str = "transpose",
        global_residual: bool = False,
        final_act: Any = "tanh",
        gradient_checkpointing: bool = False,
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}.")
        if upsample not in ("transpose", "resize_conv"):
            raise ValueError(f"upsample must be 'transpose' or 'resize_conv', got {upsample!r}.")
        if global_residual and in_channels != out_channels:
            raise ValueError(
                "global_residual=True adds the input to the output and needs in_channels == "
                f"out_channels, got {in_channels} and {out_channels}."
            )
        self.spatial_dims = spatial_dims
        self.global_residual = bool(global_residual)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)
        mode = _padding_mode(padding_type)
        bias = _conv_bias(norm, spatial_dims, conv_bias)

        layers: list[nn.Module] = [
            conv(in_channels, ngf, 7, padding=3, padding_mode=mode, bias=bias),
            _norm(norm, spatial_dims, ngf),
            nn.ReLU(inplace=True),
        ]
        # Start index in `body` of each checkpointing stage: stem, downs, residual blocks, ups.
        starts = [0]
        ch = ngf
        for _ in range(2):
            starts.append(len(layers))
            layers += [
                conv(ch, ch * 2, 3, stride=2, padding=1, bias=bias),
                _norm(norm, spatial_dims, ch * 2),
                nn.ReLU(inplace=True),
            ]
            ch *= 2
        for _ in range(n_blocks):
            starts.append(len(layers))
            layers.append(ResnetBlock(spatial_dims, ch, norm, use_dropout, padding_type, bias))
        for _ in range(2):
            starts.append(len(layers))
            if upsample == "transpose":
                up: list[nn.Module] = [
                    conv_transpose_nd(spatial_dims)(
                        ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                    )
                ]
            else:
                up = [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    conv(ch, ch // 2, 3, padding=1, padding_mode=mode, bias=bias),
                ]
            layers += [*up, _norm(norm, spatial_dims, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        self.body = nn.Sequential(*layers)
        self._stages = stages_from_starts(starts, len(layers))
        self.head = conv(ch, out_channels, 7, padding=3, padding_mode=mode)
        self.final_act = get_act_layer(final_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate ``(B, in_channels, *spatial)`` to ``(B, out_channels, *spatial)``."""
        out = self.head(self._run_stages(self.body, self._stages, x))
        if self.global_residual:
            out = out + x
        return self.final_act(out)

    def stages(self) -> list[Stage]:
        """This generator as a sequence of local stages (:mod:`medgen.nn.layerwise`), for exact
        tiled translation with :func:`medgen.tiling.layerwise_apply`: every instance norm then
        normalises with the whole image's statistics, as in a whole-image pass."""
        stages = _chain_stages(list(self.body), "body")
        # The body ends with norm → ReLU, written out by a pointwise stage: the head reads it.
        norm = act = None
        if stages[-1].name == "body.out":
            last = stages.pop()
            norm, act = last.norm, last.act
        head = Stage(
            self.head,
            conv_halo(self.head),
            norm=norm,
            act=act,
            skip=nn.Identity() if self.global_residual else None,
            skip_back=len(stages),  # the generator's input
            name="head",
        )
        stages.append(head)
        if not isinstance(self.final_act, nn.Identity):
            stages.append(Stage(self.final_act, 0, name="final_act"))
        return stages


# --------------------------------------------------------------------------------------------------
# UNet generator
# --------------------------------------------------------------------------------------------------
class UnetSkipBlock(StagedCheckpointMixin):
    """One level of the recursive pix2pix UNet: ``down -> submodule -> up``, concatenated with input.

    Down: LeakyReLU(0.2), stride-2 4-conv, norm (the outermost level has no activation or norm before
    its conv; the innermost has no norm after it). Up: ReLU, stride-2 4-transposed-conv, norm and
    optional dropout 0.5 (the outermost level ends with ``final_act`` instead of a norm). Inner levels
    return ``cat([LeakyReLU(x), up(...)], dim=1)``: upstream's in-place activation reaches the skip.

    With ``gradient_checkpointing``, this level checkpoints its own down layers and its own up layers
    (after the leading in-place ReLU, which must not modify a checkpoint input) as two separate
    stages; the inner levels checkpoint theirs, so the whole recursion is never one checkpoint.

    Args:
        spatial_dims: 2 or 3.
        outer_channels: Channels this level returns (before concatenation).
        inner_channels: Channels after the down convolution.
        in_channels: Channels of the input, defaults to ``outer_channels``.
        submodule: The next, inner level (``None`` for the innermost).
        outermost: This is the outermost level.
        norm: Normalisation spec.
        use_dropout: Dropout 0.5 after the up norm.
        final_act: Activation of the outermost level.
        gradient_checkpointing: Checkpoint this level's down and up stages (in training mode with
            grad enabled only).
        conv_bias: Bias of the convolutions followed by a norm (see :class:`UnetGenerator`).
    """

    def __init__(
        self,
        spatial_dims: int,
        outer_channels: int,
        inner_channels: int,
        in_channels: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        norm: NormSpec = "batch",
        use_dropout: bool = False,
        final_act: Any = "tanh",
        gradient_checkpointing: bool = False,
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        self.gradient_checkpointing = bool(gradient_checkpointing)
        innermost = submodule is None
        in_channels = outer_channels if in_channels is None else in_channels
        bias = _conv_bias(norm, spatial_dims, conv_bias)
        down_conv = conv_nd(spatial_dims)(
            in_channels, inner_channels, 4, stride=2, padding=1, bias=bias
        )
        up_in = inner_channels if innermost else inner_channels * 2
        up_conv_cls = conv_transpose_nd(spatial_dims)

        # Upstream's in-place LeakyReLU also activates the tensor kept for the skip connection, so
        # inner levels concatenate LeakyReLU(x); we apply it once, out of place, to the same effect.
        self.act_in = nn.Identity() if outermost else nn.LeakyReLU(0.2)
        down: list[nn.Module] = [down_conv]
        if not outermost and not innermost:
            down.append(_norm(norm, spatial_dims, inner_channels))

        up: list[nn.Module] = [nn.ReLU(inplace=True)]
        if outermost:
            up += [up_conv_cls(up_in, outer_channels, 4, stride=2, padding=1)]
            up.append(get_act_layer(final_act))
        else:
            up += [
                up_conv_cls(up_in, outer_channels, 4, stride=2, padding=1, bias=bias),
                _norm(norm, spatial_dims, outer_channels),
            ]
            if use_dropout:
                up.append(nn.Dropout(0.5))
        mid = [] if submodule is None else [submodule]
        self.model = nn.Sequential(*down, *mid, *up)
        # Index ranges in `model` (one flat Sequential, as upstream, for the state_dict keys):
        # down layers, the submodule (if any), the leading up ReLU, the remaining up layers.
        self._down = (0, len(down))
        self._sub = len(down) if mid else None
        self._up_act = len(down) + len(mid)
        self._up = (self._up_act + 1, len(self.model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the level; inner levels concatenate their (activated) input as the skip connection."""
        h = self.act_in(x)
        out = self._run_stage(self.model, *self._down, h)
        if self._sub is not None:
            out = self.model[self._sub](out)
        # The in-place ReLU stays outside the checkpoint: checkpoint inputs must not be modified.
        out = self.model[self._up_act](out)
        out = self._run_stage(self.model, *self._up, out)
        if self.outermost:
            return out
        return torch.cat([h, out], 1)


class UnetGenerator(nn.Module):
    """Recursive skip-connection UNet of pix2pix (``unet_256``: 8 downs, ``unet_128``: 7), 2D or 3D.

    Level ``i`` (0 = outermost) maps to ``ngf * min(2**i, 8)`` channels with a stride-2 4-conv, so an
    input of size ``2**num_downs`` reaches a ``1`` bottleneck. For ``num_downs >= 5`` this is exactly
    the upstream layout; levels ``4 .. num_downs - 2`` (the ``8 ngf -> 8 ngf`` levels between the
    innermost and the fixed outer four) get dropout 0.5 when ``use_dropout``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        num_downs: Number of stride-2 downsamplings (>= 2).
        ngf: Width of the outermost level.
        norm: ``"batch"`` (default), ``"instance"`` (non-affine), ``"none"``, ... or ``(name, kwargs)``.
        use_dropout: Dropout 0.5 in the middle ``8 ngf`` up blocks.
        final_act: ``"tanh"`` (default), ``None`` or any :func:`get_act_layer` spec.
        conv_bias: Whether the convolutions followed by a norm have a bias: ``None`` (default)
            decides by the norm (none before batch norm, one before non-affine instance norm or
            no norm); ``False`` with ``norm="none"`` builds upstream pix2pix/CycleGAN's
            ``norm=none`` nets, whose convolutions have no bias.
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only): every level checkpoints its own down
            and up layers (not the recursion below it, so memory really drops). Outputs, gradients
            and batch norm running statistics are unchanged. Can be toggled later through the
            attribute of the same name, which sets it on every :class:`UnetSkipBlock`.

    Input ``(B, in_channels, *spatial)`` with each spatial size divisible by ``2**num_downs``; output
    ``(B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_downs: int = 8,
        ngf: int = 64,
        norm: NormSpec = "batch",
        use_dropout: bool = False,
        final_act: Any = "tanh",
        gradient_checkpointing: bool = False,
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if num_downs < 2:
            raise ValueError(f"num_downs must be >= 2, got {num_downs}.")
        self.spatial_dims = spatial_dims
        self.num_downs = int(num_downs)

        def width(level: int) -> int:
            return ngf * min(2**level, 8)

        block: nn.Module | None = None
        for level in range(num_downs - 1, 0, -1):  # innermost first
            block = UnetSkipBlock(
                spatial_dims,
                outer_channels=width(level - 1),
                inner_channels=width(level),
                submodule=block,
                norm=norm,
                use_dropout=use_dropout and 4 <= level <= num_downs - 2,
                conv_bias=conv_bias,
            )
        self.model = UnetSkipBlock(
            spatial_dims,
            outer_channels=out_channels,
            inner_channels=ngf,
            in_channels=in_channels,
            submodule=block,
            outermost=True,
            norm=norm,
            final_act=final_act,
            conv_bias=conv_bias,
        )
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every level checkpoints its down and up stages in training."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, UnetSkipBlock):
                m.gradient_checkpointing = bool(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate ``(B, in_channels, *spatial)`` to ``(B, out_channels, *spatial)``."""
        factor = 2**self.num_downs
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"UnetGenerator with num_downs={self.num_downs} needs spatial sizes divisible by "
                f"{factor}, got {tuple(x.shape[2:])}."
            )
        return self.model(x)


# --------------------------------------------------------------------------------------------------
# discriminators
# --------------------------------------------------------------------------------------------------
def patchgan_layers(n_layers: int = 3) -> list[tuple[int, int]]:
    """``(kernel, stride)`` of each convolution of :class:`NLayerDiscriminator`, input to output.

    ``n_layers`` stride-2 4-convs, then a stride-1 4-conv and the stride-1 4-conv to one logit.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
    return [(4, 2)] * n_layers + [(4, 1), (4, 1)]


def receptive_field(n_layers: int = 3) -> int:
    """Receptive field (pixels per side) of one output logit of :class:`NLayerDiscriminator`.

    Walks the layer stack from the output back: ``r <- (r - 1) * stride + kernel``. Gives 70 for
    ``n_layers=3`` (the 70x70 PatchGAN), 34 for 2, 16 for 1, 142 for 4.
    """
    r = 1
    for kernel, stride in reversed(patchgan_layers(n_layers)):
        r = (r - 1) * stride + kernel
    return r


class NLayerDiscriminator(StagedCheckpointMixin):
    """PatchGAN discriminator (``basic`` = ``n_layers=3``, the 70x70 PatchGAN), 2D or 3D.

    Convs of kernel 4, padding 1: ``in -> ndf`` (stride 2, no norm), then ``n_layers - 1`` stride-2
    convs doubling the width (capped at ``8 ndf``), one stride-1 conv, and a stride-1 conv to one
    logit per patch; LeakyReLU(0.2) between. A 256x256 input gives 30x30 logits for ``n_layers=3``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels (for conditional GANs, input and output concatenated).
        ndf: Width of the first layer.
        n_layers: Number of stride-2 convolutions.
        norm: ``"batch"`` (default), ``"instance"`` (non-affine), ``"none"``, ... or ``(name, kwargs)``.
        conv_bias: Whether the convolutions followed by a norm (all but the first and the last) have a bias: ``None`` (default)
            decides by the norm (none before batch norm, one before non-affine instance norm or
            no norm); ``False`` with ``norm="none"`` builds upstream pix2pix/CycleGAN's
            ``norm=none`` nets, whose convolutions have no bias.
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only), one conv stage (conv, norm, LeakyReLU)
            at a time. Outputs, gradients and batch norm running statistics are unchanged. Can be
            toggled later through the attribute of the same name.

    Input ``(B, in_channels, *spatial)``; output ``(B, 1, *patches)`` of raw logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm: NormSpec = "batch",
        gradient_checkpointing: bool = False,
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)
        bias = _conv_bias(norm, spatial_dims, conv_bias)
        specs = patchgan_layers(n_layers)
        layers: list[nn.Module] = []
        starts: list[int] = []  # one checkpointing stage per conv
        ch_in = in_channels
        for i, (kernel, stride) in enumerate(specs):
            last = i == len(specs) - 1
            ch_out = 1 if last else ndf * min(2**i, 8)
            first = i == 0
            starts.append(len(layers))
            layers.append(
                conv(ch_in, ch_out, kernel, stride=stride, padding=1, bias=first or last or bias)
            )
            if not first and not last:
                layers.append(_norm(norm, spatial_dims, ch_out))
            if not last:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
            ch_in = ch_out
        self.model = nn.Sequential(*layers)
        self._stages = stages_from_starts(starts, len(layers))
        self.n_layers = n_layers

    @property
    def receptive_field(self) -> int:
        """Receptive field of one output logit, in input pixels per side."""
        return receptive_field(self.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, *spatial)`` to patch logits ``(B, 1, *patches)``."""
        return self._run_stages(self.model, self._stages, x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every conv stage (conv, norm, LeakyReLU), the last being the logits.

        For feature matching (Wang et al., "pix2pixHD", CVPR 2018; used by the VQ-GAN of Khader
        et al., "Medical Diffusion", 2023): ``n_layers + 2`` tensors, ``(B, C_i, *spatial_i)``,
        ``features(x)[-1] == forward(x)``.
        """
        outputs = []
        h = x
        for start, stop in self._stages:
            h = self._run_stage(self.model, start, stop, h)
            outputs.append(h)
        return outputs


class PixelDiscriminator(StagedCheckpointMixin):
    """1x1 PatchGAN (``pixel``): classifies each pixel/voxel independently, 2D or 3D.

    ``in -> ndf -> 2 ndf -> 1`` with 1x1 convs, LeakyReLU(0.2) and a norm after the second conv.
    As upstream, the convs after the first have a bias only when the norm has no shift.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        ndf: Width of the first layer.
        norm: ``"batch"`` (default), ``"instance"`` (non-affine), ``"none"``, ... or ``(name, kwargs)``.
        conv_bias: Whether the second and third convolutions have a bias: ``None`` (default)
            decides by the norm (none before batch norm, one before non-affine instance norm or
            no norm); ``False`` with ``norm="none"`` builds upstream pix2pix/CycleGAN's
            ``norm=none`` nets, whose convolutions have no bias.
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only), one conv stage at a time. Outputs,
            gradients and batch norm running statistics are unchanged. Can be toggled later
            through the attribute of the same name.

    Input ``(B, in_channels, *spatial)``; output ``(B, 1, *spatial)`` of raw logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        ndf: int = 64,
        norm: NormSpec = "batch",
        gradient_checkpointing: bool = False,
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)
        bias = _conv_bias(norm, spatial_dims, conv_bias)
        self.model = nn.Sequential(
            conv(in_channels, ndf, 1),
            nn.LeakyReLU(0.2, inplace=True),
            conv(ndf, ndf * 2, 1, bias=bias),
            _norm(norm, spatial_dims, ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            conv(ndf * 2, 1, 1, bias=bias),
        )
        # Checkpointing stages: conv-act, conv-norm-act, conv.
        self._stages = ((0, 2), (2, 5), (5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, *spatial)`` to per-pixel logits ``(B, 1, *spatial)``."""
        return self._run_stages(self.model, self._stages, x)


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def init_weights(module: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise conv / linear / norm weights in place, as pix2pix and CycleGAN do.

    Conv, transposed-conv and linear weights: ``normal`` N(0, gain), ``xavier`` Xavier-normal with
    ``gain``, ``kaiming`` Kaiming-normal (fan-in, ``a=0``; ``gain`` unused) or ``orthogonal`` with
    ``gain``; their biases are set to 0. Affine norm layers (batch, group, instance): weight
    N(1, gain), bias 0.

    Args:
        module: The module to initialise (recursively).
        init_type: One of ``"normal"``, ``"xavier"``, ``"kaiming"``, ``"orthogonal"``.
        gain: Standard deviation / scaling gain.

    Returns:
        ``module``, for chaining.

    Raises:
        ValueError: For an unknown ``init_type``.
    """
    key = str(init_type).lower()
    if key not in INIT_TYPES:
        raise ValueError(
            f"Unknown init_type {init_type!r}; valid are {', '.join(map(repr, INIT_TYPES))}."
        )

    def init_fn(m: nn.Module) -> None:
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and weight is not None:
            if key == "normal":
                nn.init.normal_(weight, 0.0, gain)
            elif key == "xavier":
                nn.init.xavier_normal_(weight, gain=gain)
            elif key == "kaiming":
                nn.init.kaiming_normal_(weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(weight, gain=gain)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(m, _NORM_TYPES):
            if weight is not None:
                nn.init.normal_(weight, 1.0, gain)
            if bias is not None:
                nn.init.zeros_(bias)

    with torch.no_grad():
        module.apply(init_fn)
    return module
