"""Convolutional encoder and decoder for (variational / VQ) autoencoders, 2D and 3D.

The layout follows the first stage of latent diffusion (Rombach et al., 2022): a stack of residual
levels with optional self-attention, a resolution change between levels, and a middle block of
``ResBlock → [SelfAttention] → ResBlock`` at the lowest resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medgen.nn.attention import SelfAttention
from medgen.nn.blocks import ResBlock
from medgen.nn.distributions import DiagonalGaussian
from medgen.nn.factories import (
    check_spatial_dims,
    conv_nd,
    conv_transpose_nd,
    get_act_layer,
    get_norm_layer,
)
from medgen.nn.fused import norm_act
from medgen.nn.layerwise import Stage, module_stages
from medgen.nn.sampling import Downsample, Upsample

__all__ = ["AutoencoderKLNet", "Decoder", "Encoder"]


def _validate_levels(
    channels: Sequence[int],
    num_res_blocks: int | Sequence[int],
    attention_levels: Sequence[bool] | None,
) -> tuple[list[int], list[int], list[bool]]:
    """Check the per-level arguments and expand them to one entry per level."""
    channels = [int(c) for c in channels]
    if len(channels) == 0 or any(c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}.")
    n = len(channels)
    if isinstance(num_res_blocks, int):
        blocks = [num_res_blocks] * n
    else:
        blocks = [int(b) for b in num_res_blocks]
        if len(blocks) != n:
            raise ValueError(
                f"num_res_blocks has {len(blocks)} entries but channels has {n} levels."
            )
    if any(b < 1 for b in blocks):
        raise ValueError(f"num_res_blocks must be >= 1 at every level, got {num_res_blocks}.")
    if attention_levels is None:
        attn = [False] * n
    else:
        attn = [bool(a) for a in attention_levels]
        if len(attn) != n:
            raise ValueError(
                f"attention_levels has {len(attn)} entries but channels has {n} levels."
            )
    return channels, blocks, attn


class _AsymmetricDownsample(nn.Module):
    """Zero padding of one voxel at the end of every axis, then a 3x3 convolution with stride 2
    (the first stage of latent diffusion and MONAI's ``AutoencoderKL``)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.pad = (0, 1) * spatial_dims
        self.conv = conv_nd(spatial_dims)(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


class _DeconvUpsample(nn.Module):
    """2x upsampling by a transposed convolution with kernel 2 and stride 2 (MONAI's
    ``use_convtranspose``)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.deconv = conv_transpose_nd(spatial_dims)(channels, channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(x)


def _block_factories(
    spatial_dims: int,
    norm: tuple[str, dict],
    act: str,
    num_head_channels: int | None,
    norm_num_groups: int,
    norm_eps: float,
    include_fc: bool,
) -> tuple[Callable[[int, int], ResBlock], Callable[[int], SelfAttention]]:
    """Builders of the encoder's and decoder's ResBlocks ``(C_in, C_out)`` and attentions ``(C)``."""

    def res(cin: int, cout: int) -> ResBlock:
        return ResBlock(spatial_dims, cin, cout, norm=norm, act=act)

    def attention(c: int) -> SelfAttention:
        return SelfAttention(
            spatial_dims,
            c,
            num_head_channels,
            norm_num_groups,
            norm_eps=norm_eps,
            include_fc=include_fc,
        )

    return res, attention


MID_BLOCKS = ("auto", "attention", "none")


def _mid_block(
    mid_block: str,
    attention_last: bool,
    res: Callable[[], nn.Module],
    attn: Callable[[], nn.Module],
) -> list[nn.Module]:
    """``ResBlock → [SelfAttention] → ResBlock`` (``"auto"``: attention iff the lowest level
    has it; ``"attention"``: always) or nothing (``"none"``)."""
    if mid_block not in MID_BLOCKS:
        raise ValueError(f"mid_block must be one of {MID_BLOCKS}, got {mid_block!r}.")
    if mid_block == "none":
        return []
    with_attn = mid_block == "attention" or attention_last
    return [res(), attn(), res()] if with_attn else [res(), res()]


def _out_stage(net: Encoder | Decoder) -> list[Stage]:
    """``norm_out → act_out → conv_out`` as one stage."""
    (stage,) = module_stages(net.conv_out, "conv_out")
    return [Stage(stage.fn, stage.halo, norm=net.norm_out, act=net.act_out, name="out")]


class _CheckpointMixin(nn.Module):
    """Runs a block directly or through activation checkpointing."""

    gradient_checkpointing: bool

    def _run(self, block: nn.Module, h: Tensor) -> Tensor:
        # Recompute activations in the backward pass instead of storing them. Only worthwhile
        # (and only done) when a backward pass can follow in training.
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)


class Encoder(_CheckpointMixin):
    """Convolutional encoder: image ``(B, C_in, *spatial)`` to latent ``(B, C_out, *spatial / f)``.

    ``conv_in → [ResBlock x num_res_blocks (+ SelfAttention), Downsample] per level (no Downsample
    after the last) → ResBlock → [SelfAttention] → ResBlock → norm → act → conv_out``, with
    ``f = 2 ** (len(channels) - 1)``. For a VAE set ``out_channels = 2 * latent_channels`` and
    split the output with :meth:`medgen.nn.DiagonalGaussian.from_moments`.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Image channels ``C_in``.
        out_channels: Output channels ``C_out``.
        channels: Width of each level, from full to lowest resolution.
        num_res_blocks: ResBlocks per level (an int or one int per level).
        attention_levels: Per level, whether to add self-attention after each ResBlock; the
            middle block has attention iff the last level has. ``None``: no attention.
        norm_num_groups: GroupNorm groups, clipped to divide every width.
        num_head_channels: Channels per attention head; ``None`` uses one head.
        act: Activation name (see :func:`medgen.nn.get_act_layer`).
        gradient_checkpointing: Recompute ResBlock / attention activations in the backward pass
            to save memory (in training mode with grad enabled only). Results are unchanged.
        downsample_mode: ``"conv"`` or ``"avgpool"`` (see :class:`medgen.nn.Downsample`), or
            ``"asymmetric"``: zero padding of one voxel at the end of each axis, then a 3x3
            stride-2 convolution (latent diffusion's and MONAI's choice).
        norm_eps: GroupNorm epsilon.
        act_before_out: Apply the activation between the last norm and ``conv_out`` (MONAI's
            autoencoders do not).
        mid_block: ``"auto"`` (``ResBlock → [SelfAttention] → ResBlock``, attention iff the last
            level has it), ``"attention"`` (always with attention) or ``"none"``.
        include_fc: Keep the attention output projections.
        moment_head: ``conv_out`` maps to ``out_channels / 2`` (the latent), followed by a 1x1
            convolution ``quant_conv`` to the ``out_channels`` moments (MONAI's
            ``quant_conv_mu`` and ``quant_conv_log_sigma``).

    Shapes:
        ``(B, C_in, *spatial) -> (B, C_out, *(spatial / downsample_factor))``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int | Sequence[int] = 1,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 32,
        num_head_channels: int | None = None,
        act: str = "silu",
        gradient_checkpointing: bool = False,
        downsample_mode: str = "conv",
        *,
        norm_eps: float = 1e-5,
        act_before_out: bool = True,
        mid_block: str = "auto",
        include_fc: bool = True,
        moment_head: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        channels, blocks, attn = _validate_levels(channels, num_res_blocks, attention_levels)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}."
            )
        if moment_head and out_channels % 2:
            raise ValueError(f"moment_head needs an even out_channels, got {out_channels}.")
        self.spatial_dims = spatial_dims
        self.channels = tuple(channels)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)
        norm = ("group", {"num_groups": norm_num_groups, "eps": norm_eps})

        res, attention = _block_factories(
            spatial_dims, norm, act, num_head_channels, norm_num_groups, norm_eps, include_fc
        )

        self.conv_in = conv(in_channels, channels[0], 3, padding=1)

        # One ModuleList of ResBlock / attention per level; resolution changes are separate.
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = channels[0]
        for i, width in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(blocks[i]):
                level.append(res(ch, width))
                ch = width
                if attn[i]:
                    level.append(attention(ch))
            self.levels.append(level)
            if i < len(channels) - 1:
                self.downsamples.append(
                    _AsymmetricDownsample(spatial_dims, ch)
                    if downsample_mode == "asymmetric"
                    else Downsample(spatial_dims, ch, ch, mode=downsample_mode)
                )

        self.mid = nn.ModuleList(
            _mid_block(mid_block, attn[-1], lambda: res(ch, ch), lambda: attention(ch))
        )

        self.norm_out = get_norm_layer(norm, spatial_dims, ch)
        self.act_out = get_act_layer(act) if act_before_out else nn.Identity()
        if moment_head:
            # conv to the latent, then a 1x1 conv to [mean, log-variance] (one conv holding
            # MONAI's quant_conv_mu and quant_conv_log_sigma).
            self.conv_out = conv(ch, out_channels // 2, 3, padding=1)
            self.quant_conv: nn.Module | None = conv(out_channels // 2, out_channels, 1)
        else:
            self.conv_out = conv(ch, out_channels, 3, padding=1)
            self.quant_conv = None

    @property
    def downsample_factor(self) -> int:
        """Factor by which every spatial size shrinks, ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode an image.

        Args:
            x: Image of shape ``(B, C_in, *spatial)``; every spatial size should be divisible by
                :attr:`downsample_factor`.

        Returns:
            Latent of shape ``(B, C_out, *(spatial / downsample_factor))``.
        """
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            for block in level:
                h = self._run(block, h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for block in self.mid:
            h = self._run(block, h)
        h = self.conv_out(norm_act(self.norm_out, self.act_out, h))
        return h if self.quant_conv is None else self.quant_conv(h)

    def stages(self) -> list[Stage]:
        """This encoder as a sequence of local stages (see :mod:`medgen.nn.layerwise`), for exact
        tiled encoding with :func:`medgen.tiling.layerwise_apply`."""
        if self.quant_conv is not None:
            raise ValueError("an Encoder with moment_head has no layer-by-layer form")
        stages = module_stages(self.conv_in, "conv_in")
        for i, level in enumerate(self.levels):
            for j, block in enumerate(level):
                stages += module_stages(block, f"levels.{i}.{j}")
            if i < len(self.downsamples):
                stages += module_stages(self.downsamples[i], f"downsamples.{i}")
        for j, block in enumerate(self.mid):
            stages += module_stages(block, f"mid.{j}")
        return stages + _out_stage(self)


class Decoder(_CheckpointMixin):
    """Convolutional decoder: latent ``(B, C_in, *spatial)`` to image ``(B, C_out, *spatial * f)``.

    The mirror of :class:`Encoder`: ``conv_in → ResBlock → [SelfAttention] → ResBlock →
    [ResBlock x num_res_blocks (+ SelfAttention), Upsample] per level, widths reversed (no Upsample
    after the last) → norm → act → conv_out``, with ``f = 2 ** (len(channels) - 1)``. Give it the
    same ``channels``, ``num_res_blocks`` and ``attention_levels`` as the encoder (listed from full
    to lowest resolution).

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Latent channels ``C_in``.
        out_channels: Image channels ``C_out``.
        channels: Width of each level, from full to lowest resolution (as for the encoder).
        num_res_blocks: ResBlocks per level (an int or one int per level, full to lowest).
        attention_levels: Per level (full to lowest resolution), whether to add self-attention
            after each ResBlock; the middle block has attention iff the lowest level has.
        norm_num_groups: GroupNorm groups, clipped to divide every width.
        num_head_channels: Channels per attention head; ``None`` uses one head.
        act: Activation name (see :func:`medgen.nn.get_act_layer`).
        gradient_checkpointing: Recompute ResBlock / attention activations in the backward pass
            to save memory (in training mode with grad enabled only). Results are unchanged.
        upsample_mode: ``"nearest_conv"`` or ``"transpose"`` (see :class:`medgen.nn.Upsample`),
            or ``"deconv"``: a 2x2 transposed convolution with stride 2 (MONAI's
            ``use_convtranspose``).
        norm_eps: GroupNorm epsilon.
        act_before_out: Apply the activation between the last norm and ``conv_out``.
        mid_block: ``"auto"``, ``"attention"`` or ``"none"`` (see :class:`Encoder`).
        include_fc: Keep the attention output projections.
        post_quant_conv: A biased 1x1 convolution on the latent before ``conv_in`` (MONAI's
            ``post_quant_conv``).

    Shapes:
        ``(B, C_in, *spatial) -> (B, C_out, *(spatial * upsample_factor))``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int | Sequence[int] = 1,
        attention_levels: Sequence[bool] | None = None,
        norm_num_groups: int = 32,
        num_head_channels: int | None = None,
        act: str = "silu",
        gradient_checkpointing: bool = False,
        upsample_mode: str = "nearest_conv",
        *,
        norm_eps: float = 1e-5,
        act_before_out: bool = True,
        mid_block: str = "auto",
        include_fc: bool = True,
        post_quant_conv: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        channels, blocks, attn = _validate_levels(channels, num_res_blocks, attention_levels)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}."
            )
        self.spatial_dims = spatial_dims
        self.channels = tuple(channels)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = conv_nd(spatial_dims)
        norm = ("group", {"num_groups": norm_num_groups, "eps": norm_eps})

        res, attention = _block_factories(
            spatial_dims, norm, act, num_head_channels, norm_num_groups, norm_eps, include_fc
        )

        rev_channels, rev_blocks, rev_attn = channels[::-1], blocks[::-1], attn[::-1]
        ch = rev_channels[0]
        self.post_quant_conv = conv(in_channels, in_channels, 1) if post_quant_conv else None
        self.conv_in = conv(in_channels, ch, 3, padding=1)

        self.mid = nn.ModuleList(
            _mid_block(mid_block, rev_attn[0], lambda: res(ch, ch), lambda: attention(ch))
        )

        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i, width in enumerate(rev_channels):
            level = nn.ModuleList()
            for _ in range(rev_blocks[i]):
                level.append(res(ch, width))
                ch = width
                if rev_attn[i]:
                    level.append(attention(ch))
            self.levels.append(level)
            if i < len(rev_channels) - 1:
                self.upsamples.append(
                    _DeconvUpsample(spatial_dims, ch)
                    if upsample_mode == "deconv"
                    else Upsample(spatial_dims, ch, ch, mode=upsample_mode)
                )

        self.norm_out = get_norm_layer(norm, spatial_dims, ch)
        self.act_out = get_act_layer(act) if act_before_out else nn.Identity()
        self.conv_out = conv(ch, out_channels, 3, padding=1)

    @property
    def upsample_factor(self) -> int:
        """Factor by which every spatial size grows, ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode a latent.

        Args:
            z: Latent of shape ``(B, C_in, *spatial)``.

        Returns:
            Image of shape ``(B, C_out, *(spatial * upsample_factor))``.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.conv_in(z)
        for block in self.mid:
            h = self._run(block, h)
        for i, level in enumerate(self.levels):
            for block in level:
                h = self._run(block, h)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(norm_act(self.norm_out, self.act_out, h))

    def stages(self) -> list[Stage]:
        """This decoder as a sequence of local stages (see :mod:`medgen.nn.layerwise`), for exact
        tiled decoding with :func:`medgen.tiling.layerwise_apply`."""
        stages = [] if self.post_quant_conv is None else module_stages(self.post_quant_conv, "pq")
        stages += module_stages(self.conv_in, "conv_in")
        for j, block in enumerate(self.mid):
            stages += module_stages(block, f"mid.{j}")
        for i, level in enumerate(self.levels):
            for j, block in enumerate(level):
                stages += module_stages(block, f"levels.{i}.{j}")
            if i < len(self.upsamples):
                stages += module_stages(self.upsamples[i], f"upsamples.{i}")
        return stages + _out_stage(self)


class AutoencoderKLNet(nn.Module):
    """KL autoencoder net with the arguments, layout and parameter count of MONAI's
    ``AutoencoderKL`` (Rombach et al., 2022; Pinaya et al., 2022, "Brain Imaging Generation with
    Latent Diffusion Models"), so MONAI configurations build it and their weights convert
    (:func:`medgen.convert.convert`, ``monai-autoencoderkl``) with the same outputs.

    It is an :class:`Encoder` / :class:`Decoder` pair with MONAI's choices: GroupNorm
    ``norm_eps``, asymmetric-padding stride-2 down-sampling, no activation before the last
    convolutions, a middle block ``ResBlock → SelfAttention → ResBlock`` present iff
    ``with_*_nonlocal_attn``, one-head attention, a 1x1 convolution from the latent to
    ``[mean, log-variance]`` (MONAI's ``quant_conv_mu`` and ``quant_conv_log_sigma``) and a
    biased 1x1 ``post_quant_conv`` before the decoder. Same interface as
    :class:`~medgen.nets.VAENet` (``encode`` returns a :class:`~medgen.nn.DiagonalGaussian`), so
    :class:`medgen.models.AutoencoderKL` trains it (``net._target_: medgen.nets.AutoencoderKLNet``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        out_channels: Output channels.
        num_res_blocks: ResBlocks per level (int or one per level).
        channels: Width of each level, full to lowest resolution; multiples of
            ``norm_num_groups``.
        attention_levels: Per level, whether to add self-attention after each ResBlock.
        latent_channels: Channels of the latent.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        with_encoder_nonlocal_attn: Middle block in the encoder.
        with_decoder_nonlocal_attn: Middle block in the decoder.
        use_checkpoint: Activation checkpointing of the blocks in training.
        use_convtranspose: Up-sample by a 2x2 transposed convolution instead of nearest
            interpolation and a 3x3 convolution.
        include_fc: Keep the attention output projections.
        use_combined_linear: Accepted for MONAI configurations (weight layout only).
        use_flash_attention: Accepted and ignored (attention always runs through SDPA).
        gradient_checkpointing: The same as ``use_checkpoint`` (medgen's name).

    Shapes:
        ``x``: ``(B, in_channels, *spatial)`` with sizes divisible by
        ``2 ** (len(channels) - 1)``; latents ``(B, latent_channels, *spatial / f)``.
    """

    latent_dim = None

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: int | Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_checkpoint: bool = False,
        use_convtranspose: bool = False,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        *,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every width in channels={channels} must be a multiple of "
                f"norm_num_groups={norm_num_groups} (GroupNorm)."
            )
        if len(attention_levels) != len(channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but channels has "
                f"{len(channels)} levels."
            )
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be positive, got {latent_channels}.")
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channels) - 1)
        common = dict(
            spatial_dims=spatial_dims,
            channels=channels,
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            num_head_channels=None,
            gradient_checkpointing=use_checkpoint or gradient_checkpointing,
            norm_eps=norm_eps,
            act_before_out=False,
            include_fc=include_fc,
        )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=2 * latent_channels,
            downsample_mode="asymmetric",
            mid_block="attention" if with_encoder_nonlocal_attn else "none",
            moment_head=True,
            **common,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            upsample_mode="deconv" if use_convtranspose else "nearest_conv",
            mid_block="attention" if with_decoder_nonlocal_attn else "none",
            post_quant_conv=True,
            **common,
        )

    def latent_shape(self, image_shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """Shape of one latent (without batch) for images of spatial shape ``image_shape``."""
        if image_shape is None:
            raise ValueError("a spatial latent needs the image shape")
        return (self.latent_channels, *(s // self.downsample_factor for s in image_shape))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior ``q(z|x)`` for images ``(B, C, *spatial)``."""
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, C_out, *spatial)`` from latents ``(B, latent_channels, *spatial / f)``."""
        return self.decoder(z)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` through a reparameterised posterior sample; (recon, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator=generator)), posterior

    # MONAI's AutoencoderKL method names, for code ported from MONAI.
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean of ``x`` (MONAI's ``reconstruct``)."""
        return self.decode(self.encode(x).mean)

    def encode_stage_2_inputs(self, x: Tensor) -> Tensor:
        """A posterior sample of ``x``, the input of a latent diffusion's second stage."""
        return self.encode(x).sample()

    def decode_stage_2_outputs(self, z: Tensor) -> Tensor:
        """Images from latents (MONAI's name for :meth:`decode`)."""
        return self.decode(z)
