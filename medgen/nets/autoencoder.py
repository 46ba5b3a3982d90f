"""Convolutional encoder and decoder for (variational / VQ) autoencoders, 2D and 3D.

The layout follows the first stage of latent diffusion (Rombach et al., 2022): a stack of residual
levels with optional self-attention, a resolution change between levels, and a middle block of
``ResBlock → [SelfAttention] → ResBlock`` at the lowest resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medgen.nn.attention import SelfAttention
from medgen.nn.blocks import ResBlock
from medgen.nn.factories import check_spatial_dims, conv_nd, get_act_layer, get_norm_layer
from medgen.nn.fused import norm_act
from medgen.nn.layerwise import Stage, module_stages
from medgen.nn.sampling import Downsample, Upsample

__all__ = ["Decoder", "Encoder"]


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
        downsample_mode: ``"conv"`` or ``"avgpool"`` (see :class:`medgen.nn.Downsample`).

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

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, cout, norm_num_groups=norm_num_groups, act=act)

        def attention(c: int) -> SelfAttention:
            return SelfAttention(spatial_dims, c, num_head_channels, norm_num_groups)

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
                self.downsamples.append(Downsample(spatial_dims, ch, ch, mode=downsample_mode))

        mid = [res(ch, ch)]
        if attn[-1]:
            mid.append(attention(ch))
        mid.append(res(ch, ch))
        self.mid = nn.ModuleList(mid)

        self.norm_out = get_norm_layer(("group", {"num_groups": norm_num_groups}), spatial_dims, ch)
        self.act_out = get_act_layer(act)
        self.conv_out = conv(ch, out_channels, 3, padding=1)

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
        return self.conv_out(norm_act(self.norm_out, self.act_out, h))

    def stages(self) -> list[Stage]:
        """This encoder as a sequence of local stages (see :mod:`medgen.nn.layerwise`), for exact
        tiled encoding with :func:`medgen.tiling.layerwise_apply`."""
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
        upsample_mode: ``"nearest_conv"`` or ``"transpose"`` (see :class:`medgen.nn.Upsample`).

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

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, cout, norm_num_groups=norm_num_groups, act=act)

        def attention(c: int) -> SelfAttention:
            return SelfAttention(spatial_dims, c, num_head_channels, norm_num_groups)

        rev_channels, rev_blocks, rev_attn = channels[::-1], blocks[::-1], attn[::-1]
        ch = rev_channels[0]
        self.conv_in = conv(in_channels, ch, 3, padding=1)

        mid = [res(ch, ch)]
        if rev_attn[0]:
            mid.append(attention(ch))
        mid.append(res(ch, ch))
        self.mid = nn.ModuleList(mid)

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
                self.upsamples.append(Upsample(spatial_dims, ch, ch, mode=upsample_mode))

        self.norm_out = get_norm_layer(("group", {"num_groups": norm_num_groups}), spatial_dims, ch)
        self.act_out = get_act_layer(act)
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
        stages = module_stages(self.conv_in, "conv_in")
        for j, block in enumerate(self.mid):
            stages += module_stages(block, f"mid.{j}")
        for i, level in enumerate(self.levels):
            for j, block in enumerate(level):
                stages += module_stages(block, f"levels.{i}.{j}")
            if i < len(self.upsamples):
                stages += module_stages(self.upsamples[i], f"upsamples.{i}")
        return stages + _out_stage(self)
