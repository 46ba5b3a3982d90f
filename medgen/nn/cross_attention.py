"""Multi-head cross-attention from a feature map to a sequence of context tokens."""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from medgen.nn.attention import attend, num_heads_for
from medgen.nn.blocks import zero_module
from medgen.nn.factories import check_spatial_dims, conv_nd, get_norm_layer

__all__ = ["CrossAttention", "SpatialTransformer", "TransformerBlock"]


class CrossAttention(nn.Module):
    """Residual multi-head cross-attention of spatial positions to context tokens.

    ``x + proj_out(attention(Q = to_q(norm(x)), K = to_k(c), V = to_v(c)))``: the
    ``N = prod(spatial)`` positions of ``x`` are the queries and the ``M`` context tokens ``c``
    (e.g. text or report embeddings) the keys and values, as in the conditioning mechanism of latent
    diffusion (Rombach et al., 2022, Eq. 3). Attention is ``softmax(Q K^T / sqrt(d)) V`` per head,
    computed with :func:`torch.nn.functional.scaled_dot_product_attention`. ``proj_out`` is
    zero-initialised, so a new block is the identity.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        channels: Channels ``C`` of the input and output.
        context_dim: Size ``D_c`` of each context token.
        num_head_channels: Channels ``d`` per head; ``C`` must be divisible by it. ``None`` uses one
            head with ``d = C``.
        norm_num_groups: GroupNorm groups, clipped to divide ``C``.
        norm_eps: GroupNorm epsilon.
        dropout: Dropout probability on the attention output (training only).

    Shapes:
        ``x``: ``(B, C, *spatial)``; ``context``: ``(B, M, D_c)``; output ``(B, C, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        context_dim: int,
        num_head_channels: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}.")
        if context_dim is None or context_dim < 1:
            raise ValueError(f"context_dim must be a positive int, got {context_dim!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        num_heads = num_heads_for(channels, num_head_channels)
        self.channels = channels
        self.context_dim = context_dim
        self.num_heads = num_heads

        self.norm = get_norm_layer(
            ("group", {"num_groups": norm_num_groups, "eps": norm_eps}), spatial_dims, channels
        )
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attend from every position of ``x`` to the tokens of ``context``.

        Args:
            x: Feature map of shape ``(B, C, *spatial)``.
            context: Context tokens of shape ``(B, M, D_c)``.

        Returns:
            ``x`` plus the attention output, shape ``(B, C, *spatial)``.
        """
        tokens = rearrange(self.norm(x), "b c ... -> b (...) c")
        q = rearrange(self.to_q(tokens), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(
            self.to_kv(context.to(tokens.dtype)),
            "b m (two h d) -> two b h m d",
            two=2,
            h=self.num_heads,
        ).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(self.dropout(rearrange(out, "b h n d -> b n (h d)")))
        # (B, N, C) -> (B, C, *spatial)
        return x + out.transpose(1, 2).reshape(x.shape)


class _Attention(nn.Module):
    """Multi-head attention on token sequences: ``out_proj(attention(to_q(x), to_k(c), to_v(c)))``.

    ``c`` is ``x`` itself (self-attention) when no context is given. Heads are split as
    ``(heads, head_dim)`` along the projected features. ``out_proj`` is absent (identity) when
    ``out_proj=False``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None = None,
        out_proj: bool = True,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.upcast = bool(upcast)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim) if out_proj else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x``: ``(B, N, dim)``; ``context``: ``(B, M, context_dim)`` or ``None``."""
        c = x if context is None else context.to(x.dtype)
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)
            for t in (self.to_q(x), self.to_k(c), self.to_v(c))
        )
        out = rearrange(attend(q, k, v, self.upcast), "b h n d -> b n (h d)")
        if self.out_proj is not None:
            out = self.out_proj(out)
        return self.dropout(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer with cross-attention (Vaswani et al., 2017; Rombach et al., 2022).

    ``x + attn1(LN(x))`` (self-attention), ``+ attn2(LN(x), context)`` (cross-attention; self-
    attention again when no context is given), ``+ ff(LN(x))`` with a GEGLU feed-forward
    ``linear2(a * gelu(g))``, ``[a, g] = linear1(x)``, of width ``4 * dim`` (Shazeer, 2020,
    "GLU Variants Improve Transformer"). The query/key/value projections have no bias.

    Args:
        dim: Token width ``D`` (``num_heads * head_dim``).
        num_heads: Attention heads.
        head_dim: Channels per head.
        context_dim: Width of the context tokens.
        dropout: Dropout on the attention and feed-forward outputs (training only).
        include_fc: Keep the self-attention's output projection.
        upcast: Attention in float32 whatever the input dtype.

    Shapes:
        ``x``: ``(B, N, D)``; ``context``: ``(B, M, context_dim)``; output ``(B, N, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None,
        dropout: float = 0.0,
        include_fc: bool = True,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, num_heads, head_dim, None, include_fc, dropout, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = _Attention(dim, num_heads, head_dim, context_dim, True, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 8 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)
        self.ff_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Apply the layer to tokens ``(B, N, D)``."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        a, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_dropout(self.ff_out(self.ff_dropout(a * F.gelu(gate))))


class SpatialTransformer(nn.Module):
    """Transformer over the positions of a feature map, conditioned on context tokens.

    ``x + proj_out(blocks(proj_in(norm(x))))``: GroupNorm, a 1x1 convolution to
    ``D = num_heads * head_dim`` channels, the ``N = prod(spatial)`` positions as tokens through
    ``num_layers`` :class:`TransformerBlock` (self-attention, cross-attention to the context,
    GEGLU feed-forward), and a zero-initialised 1x1 convolution back to ``C`` channels, as in the
    latent diffusion UNet (Rombach et al., 2022, Sec. 3.3) and MONAI's ``SpatialTransformer``
    (same layout and parameter count, so its weights map one to one).

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        channels: Channels ``C`` of the input and output.
        num_heads: Attention heads.
        head_dim: Channels per head (``D = num_heads * head_dim`` may be below ``C``).
        context_dim: Width of the context tokens.
        num_layers: Transformer layers.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        dropout: Dropout inside the transformer layers (training only).
        include_fc: Keep the self-attention output projections.
        upcast: Attention in float32 whatever the input dtype.

    Shapes:
        ``x``: ``(B, C, *spatial)``; ``context``: ``(B, M, context_dim)``; output like ``x``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        include_fc: bool = True,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if num_heads < 1 or head_dim < 1:
            raise ValueError(
                f"SpatialTransformer at width {channels} needs at least one head of at least one "
                f"channel, got {num_heads} heads of {head_dim} (num_head_channels too large?)."
            )
        inner = num_heads * head_dim
        conv = conv_nd(spatial_dims)
        self.norm = get_norm_layer(
            ("group", {"num_groups": norm_num_groups, "eps": norm_eps}), spatial_dims, channels
        )
        self.proj_in = conv(channels, inner, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, num_heads, head_dim, context_dim, dropout, include_fc, upcast)
            for _ in range(num_layers)
        )
        self.proj_out = zero_module(conv(inner, channels, 1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attend within ``x`` and to ``context``; returns ``(B, C, *spatial)``."""
        h = self.proj_in(self.norm(x))
        spatial = h.shape[2:]
        tokens = rearrange(h, "b c ... -> b (...) c")
        for block in self.blocks:
            tokens = block(tokens, context)
        h = tokens.transpose(1, 2).reshape(h.shape[0], -1, *spatial)
        return x + self.proj_out(h)
