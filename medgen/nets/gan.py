"""Unconditional GAN nets: the DCGAN generator (two upsampling variants), the DCGAN discriminator
and the WGAN-GP critic, 2D and 3D.

* :class:`DCGANGenerator` follows Radford et al., "Unsupervised Representation Learning with Deep
  Convolutional Generative Adversarial Networks" (ICLR 2016): the latent vector is projected and
  reshaped to a small feature map, then every stage doubles the resolution with batch norm and
  ReLU, and the last stage ends in ``tanh``. ``upsample="transpose"`` uses the paper's stride-2
  transposed convolutions; ``upsample="nearest_conv"`` resizes by nearest neighbour and then
  convolves, which Odena et al., "Deconvolution and Checkerboard Artifacts" (Distill 2016) show
  avoids the checkerboard pattern of uneven kernel overlap. These are AGGrGAN's two DCGAN variants.
* :class:`DCGANDiscriminator` mirrors it with stride-2 convolutions and LeakyReLU(0.2) (no norm on
  the first stage) and ends in one raw logit per sample.
* :class:`WGANCritic` has the same layout for Gulrajani et al., "Improved Training of Wasserstein
  GANs" (NeurIPS 2017): the gradient penalty is taken per sample, so the critic must not couple the
  samples of a batch, and batch norm is refused (layer norm, as the paper suggests, or instance norm
  instead). Its output is the unbounded critic value.
* Discriminator and critic take ``spectral_norm=True`` to wrap every convolution in
  :func:`torch.nn.utils.parametrizations.spectral_norm` (Miyato et al., "Spectral Normalization for
  Generative Adversarial Networks", ICLR 2018).

All nets are initialised as in DCGAN (weights N(0, 0.02), norm scales N(1, 0.02), biases 0) through
:func:`medgen.nets.translation.init_weights`, and take ``gradient_checkpointing`` with the same
guarantees as the translation nets: outputs, gradients, batch norm running statistics and the
spectral-norm power-iteration vectors are the same as without it. (Under ``torch.compile``, stages
with spectral norm run without checkpointing, since dynamo cannot trace the power iteration's
buffer update inside a checkpointed region.)
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.checkpoint import checkpoint

from medgen.nets.translation import init_weights
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
    split_spec,
)

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "WGANCritic"]

UPSAMPLE_MODES = ("transpose", "nearest_conv")
CRITIC_NORMS = ("none", "layer", "instance")


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _channels(channels: Sequence[int], owner: str) -> tuple[int, ...]:
    if isinstance(channels, (int, str)) or not len(channels):
        raise ValueError(
            f"{owner}: channels must be a non-empty sequence of ints, got {channels!r}."
        )
    widths = tuple(operator.index(c) for c in channels)
    if any(c < 1 for c in widths):
        raise ValueError(f"{owner}: every entry of channels must be >= 1, got {widths}.")
    return widths


def _image_sizes(
    image_size: int | Sequence[int], spatial_dims: int, num_stages: int, owner: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(image_size, size after num_stages halvings)`` per axis, or a ValueError naming both."""
    try:
        sizes = (operator.index(image_size),) * spatial_dims
    except TypeError:
        sizes = tuple(operator.index(s) for s in image_size)
    if len(sizes) != spatial_dims:
        raise ValueError(
            f"{owner}: image_size {image_size!r} has {len(sizes)} axes, expected {spatial_dims}."
        )
    factor = 2**num_stages
    if any(s < factor or s % factor for s in sizes):
        raise ValueError(
            f"{owner}: image_size {sizes} must be a positive multiple of 2**{num_stages} = {factor} "
            f"on every axis: there are {num_stages} stages (one per entry of channels), each "
            "halving or doubling the size. Change image_size or the number of channels."
        )
    return sizes, tuple(s // factor for s in sizes)


def _critic_norm(norm: NormSpec) -> NormSpec:
    """Validate a critic norm; ``"instance"`` is affine (the factory's default)."""
    name, _ = split_spec(norm, "norm")
    key = "none" if name is None else str(name).lower().replace("_", "").replace("norm", "")
    key = key or "none"
    if key == "batch":
        raise ValueError(
            "WGANCritic does not allow norm='batch': batch norm normalises each sample with "
            "statistics of the whole batch, which couples the samples, so the gradient penalty of "
            "WGAN-GP (a per-sample gradient norm) is no longer per sample. Use 'layer' (as "
            "Gulrajani et al. suggest), 'instance' or 'none'."
        )
    if not isinstance(name, str | None) or key not in (*CRITIC_NORMS, "identity"):
        raise ValueError(
            f"WGANCritic: unknown norm {norm!r}; valid are {', '.join(map(repr, CRITIC_NORMS))} "
            "(or (name, kwargs) with one of these names)."
        )
    return norm


# --------------------------------------------------------------------------------------------------
# activation checkpointing with stateful parametrizations (spectral norm)
# --------------------------------------------------------------------------------------------------
def _parametrization_buffers(modules: Sequence[nn.Module]) -> list[Tensor]:
    """Buffers of parametrizations (spectral norm's power-iteration vectors ``u``, ``v``)."""
    buffers: list[Tensor] = []
    for top in modules:
        for m in top.modules():
            if isinstance(m, parametrize.ParametrizationList):
                buffers += list(m.buffers())
    return buffers


class _SnapshotBuffers(BufferSnapshot):
    """Forward context of a checkpointed stage: remembers ``buffers`` as they were before it."""


class _ReplayFromSnapshot(RestoreRunningStats):
    """Recompute context: runs the stage from the pre-forward parametrization state.

    Spectral norm in training advances its power iteration (``u``, ``v``) on every weight access,
    so a recomputation would see a different ``sigma`` than the original forward. On entry, every
    tracked buffer is saved (as by :class:`~medgen.nn.checkpointing.RestoreRunningStats`) and the
    parametrization buffers are set back to their snapshot from before the original forward; on
    exit all buffers are restored, so they end as after the original forward and the recomputed
    weights are identical.
    """

    def __init__(self, buffers: list[Tensor], snapshot: _SnapshotBuffers) -> None:
        super().__init__(buffers)
        self.snapshot = snapshot

    def __enter__(self) -> None:
        super().__enter__()
        with torch.no_grad():
            for buffer, saved in zip(self.snapshot.buffers, self.snapshot.saved, strict=True):
                buffer.copy_(saved)


def _snapshot_contexts(
    stats: list[Tensor], param_buffers: list[Tensor]
) -> tuple[_SnapshotBuffers, _ReplayFromSnapshot]:
    snapshot = _SnapshotBuffers(param_buffers)
    return snapshot, _ReplayFromSnapshot(stats + param_buffers, snapshot)


class _GANStagedMixin(StagedCheckpointMixin):
    """:class:`~medgen.nn.checkpointing.StagedCheckpointMixin` that also replays spectral norm
    exactly."""

    def _run_stage(self, layers: nn.Sequential, start: int, stop: int, h: Tensor) -> Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return apply_layers(layers, start, stop, h)
        stage = [layers[i] for i in range(start, stop)]
        param_buffers = _parametrization_buffers(stage)
        if not param_buffers:  # then the translation nets' checkpointing is already exact
            return checkpoint_stage(layers, start, stop, h)
        if torch.compiler.is_compiling():
            # Dynamo refuses the power iteration's buffer update inside a checkpointed region
            # ("unsafe side effect"), so under torch.compile spectral-norm stages are not
            # checkpointed: same results, without the memory saving.
            return apply_layers(layers, start, stop, h)
        fn = functools.partial(apply_layers, layers, start, stop)
        context_fn = functools.partial(
            _snapshot_contexts, tracked_stat_buffers(stage), param_buffers
        )
        return checkpoint(fn, h, use_reentrant=False, context_fn=context_fn)


# --------------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------------
class DCGANGenerator(_GANStagedMixin):
    """DCGAN generator (Radford et al., ICLR 2016), 2D or 3D, with two upsampling variants.

    Layout, with ``n = len(channels)`` and ``s0 = image_size / 2**n`` per axis: a linear projection
    of the latent to ``channels[0] * prod(s0)`` features reshaped to ``(B, channels[0], *s0)``
    ("project and reshape"), norm, ReLU; then ``n`` stages that each double the resolution, going
    ``channels[0] -> channels[1] -> ... -> channels[-1] -> out_channels``, with norm and ReLU after
    every stage but the last, which has no norm and ends in ``out_activation``.

    Args:
        spatial_dims: 2 or 3.
        latent_dim: Width of the latent vector.
        out_channels: Channels of the generated image.
        image_size: Output size, an int or one int per axis (e.g. ``(8, 16, 16)``); each must be a
            multiple of ``2**len(channels)``.
        channels: Width after the projection and after each upsampling stage but the last.
        upsample: ``"transpose"`` (4-kernel stride-2 transposed convolution, DCGAN) or
            ``"nearest_conv"`` (nearest x2 then a 3-convolution, Odena et al., Distill 2016).
        norm: ``"batch"`` (default, DCGAN), ``"instance"`` (non-affine), ``"none"``, ... or
            ``(name, kwargs)``, as for the translation nets. Layers before a norm with a learned
            shift have no bias.
        out_activation: ``"tanh"`` (default) or ``None`` / ``"none"`` for raw outputs.
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only), one stage at a time (projection, each
            upsampling). Outputs, gradients and batch norm running statistics are unchanged. Can
            be toggled later through the attribute of the same name.

    Input: the latent ``(B, latent_dim)`` (or ``(B, latent_dim, 1, ..., 1)``); output
    ``(B, out_channels, *image_size)``.

    Example:
        >>> g = DCGANGenerator(3, latent_dim=64, image_size=(16, 32, 32), channels=(64, 32))
        >>> g(g.sample_latent(2)).shape
        torch.Size([2, 1, 16, 32, 32])
    """

    def __init__(
        self,
        spatial_dims: int,
        latent_dim: int = 100,
        out_channels: int = 1,
        image_size: int | Sequence[int] = 64,
        channels: Sequence[int] = (256, 128, 64, 32),
        upsample: str = "transpose",
        norm: NormSpec = "batch",
        out_activation: str | None = "tanh",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        name = type(self).__name__
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(
                f"{name}: upsample must be one of {', '.join(map(repr, UPSAMPLE_MODES))}, "
                f"got {upsample!r}."
            )
        if latent_dim < 1 or out_channels < 1:
            raise ValueError(
                f"{name}: latent_dim and out_channels must be >= 1, got {latent_dim} and "
                f"{out_channels}."
            )
        widths = _channels(channels, name)
        self.image_size, self.initial_size = _image_sizes(
            image_size, spatial_dims, len(widths), name
        )
        self.spatial_dims = spatial_dims
        self.latent_dim = int(latent_dim)
        self.out_channels = int(out_channels)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)
        conv_t = conv_transpose_nd(spatial_dims)

        def norm_act(ch: int) -> tuple[list[nn.Module], bool]:
            layer = get_norm_layer(norm, spatial_dims, ch, instance_affine=False)
            # A bias before a norm with its own shift is redundant (DCGAN's BN layers).
            return [layer, nn.ReLU(inplace=True)], getattr(layer, "bias", None) is None

        tail, bias = norm_act(widths[0])
        layers: list[nn.Module] = [
            nn.Linear(self.latent_dim, widths[0] * math.prod(self.initial_size), bias=bias),
            nn.Unflatten(1, (widths[0], *self.initial_size)),
            *tail,
        ]
        starts = [0]
        outs = [*widths[1:], self.out_channels]
        for i, (ch_in, ch_out) in enumerate(zip(widths, outs, strict=True)):
            last = i == len(widths) - 1
            tail, bias = ([get_act_layer(out_activation)], True) if last else norm_act(ch_out)
            starts.append(len(layers))
            if upsample == "transpose":
                layers.append(conv_t(ch_in, ch_out, 4, stride=2, padding=1, bias=bias))
            else:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    conv(ch_in, ch_out, 3, padding=1, bias=bias),
                ]
            layers += tail
        self.model = nn.Sequential(*layers)
        self._stages = stages_from_starts(starts, len(layers))
        init_weights(self, "normal", 0.02)

    def sample_latent(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``(num, latent_dim)`` standard normal latents on the CPU (float32).

        Drawn on the CPU so that a seeded ``generator`` gives the same latents on every machine;
        move them to the net's device before the forward.
        """
        return torch.randn(num, self.latent_dim, generator=generator)

    def forward(self, z: Tensor) -> Tensor:
        """Generate ``(B, out_channels, *image_size)`` from latents ``(B, latent_dim)``."""
        if z.dim() == 2 + self.spatial_dims and all(s == 1 for s in z.shape[2:]):
            z = z.flatten(1)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{type(self).__name__} expects latents of shape (B, {self.latent_dim}) or "
                f"(B, {self.latent_dim}{', 1' * self.spatial_dims}), got {tuple(z.shape)}."
            )
        return self._run_stages(self.model, self._stages, z)


# --------------------------------------------------------------------------------------------------
# discriminator and critic
# --------------------------------------------------------------------------------------------------
class _StridedConvClassifier(_GANStagedMixin):
    """Shared layout of :class:`DCGANDiscriminator` and :class:`WGANCritic`.

    Stage ``i``: 4-conv stride 2 padding 1 to ``channels[i]``, norm (not on the first stage),
    LeakyReLU(0.2); a last stage convolves the remaining ``image_size / 2**len(channels)`` map with
    a kernel of that size to one value per sample.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        image_size: int | Sequence[int],
        channels: Sequence[int],
        make_norm: Callable[[int], nn.Module],
        spectral_norm: bool,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        name = type(self).__name__
        widths = _channels(channels, name)
        self.image_size, self.final_size = _image_sizes(image_size, spatial_dims, len(widths), name)
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)

        layers: list[nn.Module] = []
        starts: list[int] = []  # one checkpointing stage per conv
        ch_in = self.in_channels
        for i, ch in enumerate(widths):
            starts.append(len(layers))
            tail = [] if i == 0 else [make_norm(ch)]
            bias = not tail or getattr(tail[0], "bias", None) is None
            layers += [conv(ch_in, ch, 4, stride=2, padding=1, bias=bias), *tail]
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            ch_in = ch
        starts.append(len(layers))
        layers.append(conv(ch_in, 1, self.final_size))
        self.model = nn.Sequential(*layers)
        self._stages = stages_from_starts(starts, len(layers))
        init_weights(self, "normal", 0.02)
        if spectral_norm:
            # Wrapped after initialisation, so the power iteration starts from the final weights.
            for m in [m for m in self.modules() if isinstance(m, nn.modules.conv._ConvNd)]:
                parametrizations.spectral_norm(m)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, in_channels, *image_size)`` to one raw score per sample, ``(B, 1)``."""
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"{type(self).__name__} was built for image_size {self.image_size}, got an input "
                f"of shape {tuple(x.shape)}."
            )
        return self._run_stages(self.model, self._stages, x).flatten(1)


class DCGANDiscriminator(_StridedConvClassifier):
    """DCGAN discriminator (Radford et al., ICLR 2016), 2D or 3D: one logit per sample.

    ``len(channels)`` stages of 4-conv stride 2 padding 1, norm (none on the first stage) and
    LeakyReLU(0.2), then a convolution whose kernel covers the remaining
    ``image_size / 2**len(channels)`` map, giving one raw logit (no sigmoid: pair it with a
    logits loss such as ``BCEWithLogits``, hinge or least squares).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        image_size: Input size, an int or one int per axis; each must be a multiple of
            ``2**len(channels)``.
        channels: Width after each stride-2 convolution.
        norm: ``"batch"`` (default, DCGAN), ``"instance"`` (non-affine), ``"none"``, ... or
            ``(name, kwargs)``, as for the translation nets.
        spectral_norm: Wrap every convolution in spectral normalisation (Miyato et al., ICLR 2018).
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only), one conv stage at a time. Outputs,
            gradients, batch norm running statistics and spectral norm vectors are unchanged. Can
            be toggled later through the attribute of the same name.

    Input ``(B, in_channels, *image_size)``; output ``(B, 1)`` raw logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 64,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm: NormSpec = "batch",
        spectral_norm: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        sd = check_spatial_dims(spatial_dims)
        super().__init__(
            sd,
            in_channels,
            image_size,
            channels,
            functools.partial(get_norm_layer, norm, sd, instance_affine=False),
            spectral_norm,
            gradient_checkpointing,
        )


class WGANCritic(_StridedConvClassifier):
    """WGAN-GP critic (Gulrajani et al., NeurIPS 2017), 2D or 3D: one unbounded score per sample.

    The layout of :class:`DCGANDiscriminator`, but the samples of a batch never interact: the
    gradient penalty ``(||grad_x D(x_hat)|| - 1)**2`` is a per-sample quantity, and batch norm
    would make each score depend on the rest of the batch. ``norm="batch"`` is therefore refused;
    the paper recommends layer norm. The output is linear (no sigmoid).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        image_size: Input size, an int or one int per axis; each must be a multiple of
            ``2**len(channels)``.
        channels: Width after each stride-2 convolution.
        norm: ``"none"`` (default), ``"layer"`` (``GroupNorm(1, C)``, affine) or ``"instance"``
            (affine), or ``(name, kwargs)`` with one of these names.
        spectral_norm: Wrap every convolution in spectral normalisation (Miyato et al., ICLR 2018).
        gradient_checkpointing: Recompute activations in the backward pass instead of storing
            them (in training mode with grad enabled only), one conv stage at a time. Outputs,
            gradients and spectral norm vectors are unchanged, through the double backward of
            the gradient penalty too. Can be toggled later through the attribute of the same
            name.

    Input ``(B, in_channels, *image_size)``; output ``(B, 1)`` critic values.

    Raises:
        ValueError: For ``norm="batch"`` (it couples the samples) or an unknown norm.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 64,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm: NormSpec = "none",
        spectral_norm: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        sd = check_spatial_dims(spatial_dims)
        norm = _critic_norm(norm)
        super().__init__(
            sd,
            in_channels,
            image_size,
            channels,
            functools.partial(get_norm_layer, norm, sd),
            spectral_norm,
            gradient_checkpointing,
        )
