"""Time- and class-conditioned UNet backbone for pixel and latent diffusion, 2D and 3D.

The layout is the ADM / latent-diffusion UNet (Ho et al., 2020; Dhariwal & Nichol, 2021; Rombach
et al., 2022) with the arguments (names, order, defaults) of MONAI's ``DiffusionModelUNet``, so a
MONAI configuration builds the same net, whose weights :mod:`medgen.convert` maps one to one. It is our own implementation on :mod:`medgen.nn` blocks: SDPA
attention, activation checkpointing as a flag, channels-last friendly and free of graph breaks under
``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medgen.nn.attention import SelfAttention
from medgen.nn.blocks import ResBlock, zero_module
from medgen.nn.cross_attention import CrossAttention, SpatialTransformer
from medgen.nn.embeddings import timestep_embedding
from medgen.nn.factories import check_spatial_dims, conv_nd, get_norm_layer
from medgen.nn.fused import norm_act
from medgen.nn.sampling import Downsample, Upsample
from medgen.utils.sequences import per_axis

__all__ = ["DiffusionUNet"]


class _UNetBlock(nn.Module):
    """``ResBlock → [attention]``, run as one checkpointed unit.

    ``attn`` is a :class:`SelfAttention` (unconditioned sites) or a :class:`SpatialTransformer`
    (conditioned sites); ``cross_attn`` holds the pre-#18 conditioned layout
    (``SelfAttention → CrossAttention x L``, ``legacy_layout=True``).
    """

    def __init__(
        self,
        res: ResBlock,
        attn: SelfAttention | SpatialTransformer | None,
        cross_attn: Sequence[CrossAttention] = (),
    ) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.cross_attn = nn.ModuleList(cross_attn)

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        h = self.res(h, emb)
        if isinstance(self.attn, SpatialTransformer):
            h = self.attn(h, context)
        elif self.attn is not None:
            h = self.attn(h)
        for block in self.cross_attn:
            h = block(h, context)
        return h


class _Resample(nn.Module):
    """A resolution change: a plain (de)convolution or a time-conditioned ResBlock.

    With ``resblock_updown`` the ResBlock resamples inside itself (``ResBlock(resample=...)``,
    as MONAI); with ``legacy_layout=True`` it runs at the finer resolution around a
    parameter-free resampling (``[ResBlock →] avgpool`` down, ``nearest x2 → ResBlock`` up).
    """

    def __init__(
        self, resample: nn.Module | None, res: ResBlock | None, up: bool, legacy: bool = False
    ) -> None:
        super().__init__()
        self.resample = resample
        self.res = res
        self.up = up
        self.legacy = legacy

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        if self.res is None:
            return self.resample(h)
        if not self.legacy:
            return self.res(h, emb)
        if self.up:
            return self.res(F.interpolate(h, scale_factor=2.0, mode="nearest"), emb)
        return self.resample(self.res(h, emb))


def _legacy_layout_hint(module: DiffusionUNet, state_dict: dict, prefix: str, *args) -> None:
    # A checkpoint of the pre-#18 conditioned layout: say how to load it (load_state_dict
    # raises with every message in error_msgs, the last argument).
    if not module.legacy_layout and any(
        k.startswith(prefix) and ".cross_attn." in k for k in state_dict
    ):
        args[-1].append(
            "the weights have medgen's conditioned layout from before issue #18 "
            "(SelfAttention + CrossAttention); build the net with legacy_layout=True to load them"
        )


class DiffusionUNet(nn.Module):
    """Diffusion UNet ``eps_theta(x_t, t, context, class)`` for 2D images and 3D volumes.

    ``conv_in → encoder → middle → decoder → GroupNorm → SiLU → zero-init conv_out``:

    * time embedding: ``sinusoidal(t, channels[0]) → Linear → SiLU → Linear`` to
      ``E = 4 * channels[0]``, plus a learned class embedding when ``num_class_embeds`` is set,
      plus an MLP embedding of ``K`` scalar conditions when ``num_scalar_conds = K`` is set;
      every ResBlock receives it;
    * encoder level ``i``: ``num_res_blocks[i]`` x (ResBlock ``[→ attention]``), attention where
      ``attention_levels[i]``, then a stride-2 Downsample (none after the last level);
    * middle: ``ResBlock → attention → ResBlock``;
    * decoder level ``i`` (widths reversed): ``num_res_blocks[i] + 1`` blocks, each fed the
      concatenation of the running features and one encoder skip, then an Upsample (none after the
      last level).

    Attention is a :class:`~medgen.nn.SelfAttention` without conditioning, and a
    :class:`~medgen.nn.SpatialTransformer` (``transformer_num_layers`` layers of self-attention,
    cross-attention to the context and a GEGLU feed-forward) with ``with_conditioning``.

    Arguments, their positional order and their defaults are those of MONAI's
    ``DiffusionModelUNet`` (Pinaya et al., 2022, "Brain Imaging Generation with Latent Diffusion
    Models"), and every configuration it accepts builds the same layout with the same parameter
    count, so :func:`medgen.convert.convert` maps its weights one to one. Attention always runs
    through SDPA (flash / memory-efficient kernels where available), so ``use_flash_attention``
    is accepted and ignored, as is ``use_combined_linear`` (a weight layout the converter
    handles). medgen's additions are keyword-only.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out`` (e.g. ``C_in`` for eps / v prediction).
        num_res_blocks: Encoder ResBlocks per level (int or one per level); the decoder has one more.
        channels: Width of each level, from full to lowest resolution.
        attention_levels: Per level, whether to add attention after each ResBlock.
        norm_num_groups: GroupNorm groups; every width must be a multiple of it.
        norm_eps: GroupNorm epsilon.
        resblock_updown: Resample through ResBlocks (average pooling / nearest interpolation
            inside the block) instead of plain (de)convolutions.
        num_head_channels: Channels per attention head (int or one per level); each width with
            (unconditioned) attention must be divisible by it.
        with_conditioning: Condition the attention sites on a context ``(B, M, cross_attention_dim)``.
        transformer_num_layers: Transformer layers per conditioned attention site.
        cross_attention_dim: Size of each context token; required iff ``with_conditioning``.
        num_class_embeds: Number of classes for class conditioning, or ``None``.
        upcast_attention: Compute attention in float32 under half precision.
        dropout_cattn: Dropout probability inside the conditioned attention sites.
        include_fc: Keep the output projections of the self-attentions.
        use_combined_linear: Accepted for MONAI configurations (weight layout only).
        use_flash_attention: Accepted and ignored (SDPA is always used).
        dropout: Dropout probability inside ResBlocks.
        gradient_checkpointing: Recompute block activations in the backward pass to save memory (in
            training mode with grad enabled only). Results are unchanged.
        scale_shift: Inject the time embedding as GroupNorm scale and shift (ADM) instead of by
            addition (MONAI's default).
        num_scalar_conds: Number ``K`` of scalar conditions (e.g. age, spacing, a modality code),
            or ``None``. They are embedded by ``Linear(2K, E) → SiLU → Linear(E, E)`` applied to
            ``[values, known]`` (NaN values count as unknown and are zeroed, ``known`` is the 0/1
            indicator) and added to the time embedding, as MAISI adds its spacing embedding. A
            NaN marks a missing value; all-NaN rows are the null condition of classifier-free
            guidance. Standardise the values (e.g. age / 100) before passing them.
        legacy_layout: Build the layout of medgen before issue #18, to load its checkpoints:
            conditioned sites are ``SelfAttention → CrossAttention x transformer_num_layers``
            (no feed-forward), ``resblock_updown`` resamples around the ResBlock, and GroupNorm
            groups are clipped to divide each width instead of raising.

    Shapes:
        ``x``: ``(B, C_in, *spatial)`` with every spatial size divisible by
        ``2 ** (len(channels) - 1)``; ``timesteps``: ``(B,)`` (or one value for the whole batch);
        output ``(B, C_out, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        resblock_updown: bool = False,
        num_head_channels: int | Sequence[int] = 8,
        with_conditioning: bool = False,
        transformer_num_layers: int = 1,
        cross_attention_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        dropout_cattn: float = 0.0,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        *,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        scale_shift: bool = False,
        num_scalar_conds: int | None = None,
        legacy_layout: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}."
            )
        channels = [int(c) for c in channels]
        if len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}.")
        n = len(channels)
        if n != 4 and (
            num_res_blocks == (2, 2, 2, 2)
            or tuple(bool(a) for a in attention_levels) == (False, False, True, True)
        ):
            raise ValueError(
                f"channels has {n} levels but num_res_blocks or attention_levels is left at "
                "MONAI's 4-level default ((2, 2, 2, 2) / (False, False, True, True)); give both "
                f"for your {n} levels, e.g. num_res_blocks=1 and attention_levels={[False] * n}."
            )
        attention_levels = [bool(a) for a in attention_levels]
        if len(attention_levels) != n:
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but channels has {n} levels."
            )
        if not legacy_layout and any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every width in channels={channels} must be a multiple of "
                f"norm_num_groups={norm_num_groups} (GroupNorm)."
            )
        blocks = per_axis(num_res_blocks, n, "num_res_blocks (one per level of channels)")
        if any(b < 1 for b in blocks):
            raise ValueError(f"num_res_blocks must be >= 1 at every level, got {num_res_blocks}.")
        heads = per_axis(num_head_channels, n, "num_head_channels (one per level of channels)")
        transformer = bool(with_conditioning) and not legacy_layout
        for i in range(n):
            # The middle block always has attention, at the width of the last level.
            if not (attention_levels[i] or i == n - 1):
                continue
            if heads[i] < 1 or (not transformer and channels[i] % heads[i] != 0):
                raise ValueError(
                    f"channels[{i}] = {channels[i]} must be divisible by num_head_channels[{i}] = "
                    f"{heads[i]} (level {i} has attention)."
                )
            if transformer and heads[i] > channels[i]:
                raise ValueError(
                    f"num_head_channels[{i}] = {heads[i]} exceeds channels[{i}] = {channels[i]} "
                    f"(level {i} has attention)."
                )
        if with_conditioning and cross_attention_dim is None:
            raise ValueError(
                "with_conditioning=True needs cross_attention_dim (the size of each context token)."
            )
        if cross_attention_dim is not None and not with_conditioning:
            raise ValueError("cross_attention_dim is set but with_conditioning=False; set both.")
        if cross_attention_dim is not None and cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim must be positive, got {cross_attention_dim}.")
        if num_class_embeds is not None and num_class_embeds < 1:
            raise ValueError(f"num_class_embeds must be positive or None, got {num_class_embeds}.")
        if num_scalar_conds is not None and num_scalar_conds < 1:
            raise ValueError(f"num_scalar_conds must be positive or None, got {num_scalar_conds}.")
        if transformer_num_layers < 1:
            raise ValueError(f"transformer_num_layers must be >= 1, got {transformer_num_layers}.")
        for name, p in (("dropout", dropout), ("dropout_cattn", dropout_cattn)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}.")
        if norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}.")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = tuple(channels)
        self.with_conditioning = bool(with_conditioning)
        self.num_class_embeds = num_class_embeds
        self.num_scalar_conds = num_scalar_conds
        self.gradient_checkpointing = bool(gradient_checkpointing)

        conv = conv_nd(spatial_dims)
        norm = ("group", {"num_groups": norm_num_groups, "eps": norm_eps})
        emb_dim = 4 * channels[0]

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                spatial_dims,
                cin,
                cout,
                emb_dim,
                norm=norm,
                norm_num_groups=norm_num_groups,
                dropout=dropout,
                scale_shift=scale_shift,
                resample=resample,
            )

        def block(cin: int, cout: int, level: int, with_attn: bool) -> _UNetBlock:
            attn: SelfAttention | SpatialTransformer | None = None
            cross: list[CrossAttention] = []
            if with_attn and transformer:
                attn = SpatialTransformer(
                    spatial_dims,
                    cout,
                    cout // heads[level],
                    heads[level],
                    cross_attention_dim,
                    num_layers=transformer_num_layers,
                    norm_num_groups=norm_num_groups,
                    norm_eps=norm_eps,
                    dropout=dropout_cattn,
                    include_fc=include_fc,
                    upcast=upcast_attention,
                )
            elif with_attn:
                attn = SelfAttention(
                    spatial_dims,
                    cout,
                    heads[level],
                    norm_num_groups,
                    norm_eps=norm_eps,
                    include_fc=include_fc or legacy_layout,
                    upcast=upcast_attention,
                )
                if self.with_conditioning:  # legacy layout
                    cross = [
                        CrossAttention(
                            spatial_dims,
                            cout,
                            cross_attention_dim,
                            heads[level],
                            norm_num_groups,
                            norm_eps=norm_eps,
                            dropout=dropout_cattn,
                        )
                        for _ in range(transformer_num_layers)
                    ]
            return _UNetBlock(res(cin, cout), attn, cross)

        def down(ch: int) -> _Resample:
            if not resblock_updown:
                return _Resample(Downsample(spatial_dims, ch, mode="conv"), None, up=False)
            if legacy_layout:
                pool = Downsample(spatial_dims, ch, mode="avgpool")
                return _Resample(pool, res(ch, ch), up=False, legacy=True)
            return _Resample(None, res(ch, ch, "down"), up=False)

        def up(ch: int) -> _Resample:
            if not resblock_updown:
                return _Resample(Upsample(spatial_dims, ch, mode="nearest_conv"), None, up=True)
            if legacy_layout:
                return _Resample(None, res(ch, ch), up=True, legacy=True)
            return _Resample(None, res(ch, ch, "up"), up=True)

        # Time (and class) embedding.
        self.time_embed = nn.Sequential(
            nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embedding = (
            nn.Embedding(num_class_embeds, emb_dim) if num_class_embeds is not None else None
        )
        self.scalar_embedding = (
            nn.Sequential(
                nn.Linear(2 * num_scalar_conds, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            if num_scalar_conds is not None
            else None
        )

        self.conv_in = conv(in_channels, channels[0], 3, padding=1)

        # Encoder; `skip_channels` records the width of every feature map kept for the decoder.
        skip_channels = [channels[0]]
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = channels[0]
        for i, width in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(blocks[i]):
                level.append(block(ch, width, i, attention_levels[i]))
                ch = width
                skip_channels.append(ch)
            self.down_levels.append(level)
            if i < n - 1:
                self.downsamples.append(down(ch))
                skip_channels.append(ch)

        # Middle.
        self.mid_block = block(ch, ch, n - 1, True)
        self.mid_res = res(ch, ch)

        # Decoder.
        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for j, i in enumerate(reversed(range(n))):
            level = nn.ModuleList()
            for _ in range(blocks[i] + 1):
                level.append(block(ch + skip_channels.pop(), channels[i], i, attention_levels[i]))
                ch = channels[i]
            self.up_levels.append(level)
            if j < n - 1:
                self.upsamples.append(up(ch))
        assert not skip_channels, "internal error: unused skip connections"

        self.norm_out = get_norm_layer(norm, spatial_dims, ch)
        self.act_out = nn.SiLU()
        self.conv_out = zero_module(conv(ch, out_channels, 3, padding=1))
        self.legacy_layout = bool(legacy_layout)
        self.register_load_state_dict_pre_hook(_legacy_layout_hint)

    @property
    def downsample_factor(self) -> int:
        """Factor every spatial size must be divisible by, ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def _run(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        # Recompute activations in the backward pass instead of storing them; only in training
        # with grad enabled, where a backward pass can follow.
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
        down_block_additional_residuals: Sequence[Tensor] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        scalars: Tensor | None = None,
    ) -> Tensor:
        """Predict the network target (noise, velocity or clean sample) for ``x`` at ``timesteps``.

        Args:
            x: Noisy input of shape ``(B, C_in, *spatial)``.
            timesteps: Timesteps (or continuous noise levels) of shape ``(B,)``, or one value for
                the whole batch.
            context: Context tokens ``(B, M, cross_attention_dim)``; required iff
                ``with_conditioning``.
            class_labels: Integer class labels ``(B,)``; required iff ``num_class_embeds`` is set.
            down_block_additional_residuals: Tensors added to the encoder's skip connections (in
                their order: ``conv_in``, each block, each down-sampling), as MONAI's ControlNet
                feeds them (Zhang et al., 2023, "Adding Conditional Control to Text-to-Image
                Diffusion Models").
            mid_block_additional_residual: Tensor added to the middle block's output.
            scalars: Scalar conditions ``(B, K)`` (NaN = unknown); required iff
                ``num_scalar_conds`` is set.

        Returns:
            Output of shape ``(B, C_out, *spatial)``.

        Raises:
            ValueError: If ``context`` or ``class_labels`` is missing when needed or given when the
                net was not built for it.
        """
        if self.with_conditioning and context is None:
            raise ValueError("This DiffusionUNet has with_conditioning=True; pass `context`.")
        if not self.with_conditioning and context is not None:
            raise ValueError("Got `context` but the net was built with with_conditioning=False.")
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                f"This DiffusionUNet has num_class_embeds={self.num_class_embeds}; pass "
                f"`class_labels`."
            )
        if self.class_embedding is None and class_labels is not None:
            raise ValueError("Got `class_labels` but the net was built with num_class_embeds=None.")
        if self.scalar_embedding is not None and (
            scalars is None or scalars.shape[-1] != self.num_scalar_conds
        ):
            raise ValueError(
                f"This DiffusionUNet has num_scalar_conds={self.num_scalar_conds}; pass `scalars` "
                f"of shape (B, {self.num_scalar_conds})."
            )
        if self.scalar_embedding is None and scalars is not None:
            raise ValueError("Got `scalars` but the net was built with num_scalar_conds=None.")

        # (B,) timesteps -> (B, E); one timestep is shared by the whole batch.
        if timesteps.ndim > 1:
            raise ValueError(
                f"timesteps must have shape (B,) or be one value, got {tuple(timesteps.shape)}."
            )
        t = timesteps.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.channels[0]).to(x.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        if self.scalar_embedding is not None:
            values = scalars.reshape(x.shape[0], -1).to(emb.dtype)
            known = torch.isfinite(values)
            values = torch.where(known, values, torch.zeros_like(values))
            emb = emb + self.scalar_embedding(torch.cat([values, known.to(values.dtype)], dim=1))

        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down_levels):
            for block in level:
                h = self._run(block, h, emb, context)
                skips.append(h)
            if i < len(self.downsamples):
                h = self._run(self.downsamples[i], h, emb)
                skips.append(h)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                    f"tensors; this net keeps {len(skips)} skip connections."
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]

        h = self._run(self.mid_block, h, emb, context)
        h = self._run(self.mid_res, h, emb)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        for i, level in enumerate(self.up_levels):
            for block in level:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
            if i < len(self.upsamples):
                h = self._run(self.upsamples[i], h, emb)

        return self.conv_out(norm_act(self.norm_out, self.act_out, h))
