"""Multi-head cross-attention from a feature map to a sequence of context tokens."""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from medgen.nn.attention import num_heads_for
from medgen.nn.blocks import zero_module
from medgen.nn.factories import check_spatial_dims, get_norm_layer

__all__ = ["CrossAttention"]


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
