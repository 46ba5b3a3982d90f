"""Multi-head self-attention over all spatial positions of a feature map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from medgen.nn.blocks import zero_module
from medgen.nn.factories import check_spatial_dims, conv_nd, get_norm_layer

__all__ = ["SelfAttention", "attend"]


def num_heads_for(channels: int, num_head_channels: int | None) -> int:
    """Number of attention heads of ``num_head_channels`` each (one head when ``None``)."""
    if num_head_channels is None:
        return 1
    if num_head_channels < 1 or channels % num_head_channels != 0:
        raise ValueError(
            f"channels ({channels}) must be divisible by num_head_channels ({num_head_channels})."
        )
    return channels // num_head_channels


def attend(q: Tensor, k: Tensor, v: Tensor, upcast: bool = False) -> Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` on ``(B, h, N, d)`` tensors through SDPA.

    With ``upcast`` the product is computed in float32 and cast back to ``q``'s dtype (the
    ``upcast_attention`` of latent diffusion UNets, for half-precision stability).
    """
    if upcast and q.dtype != torch.float32:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over every spatial position (Vaswani et al., 2017).

    ``x + proj_out(attention(qkv(norm(x))))`` where the ``N = prod(spatial)`` positions are the
    tokens, ``qkv`` is a 1x1 convolution (applied as a linear layer on the tokens) and ``attention``
    is ``softmax(Q K^T / sqrt(d)) V`` per head, computed with
    :func:`torch.nn.functional.scaled_dot_product_attention` on head-contiguous ``(B, h, N, d)``
    tensors, so its fused flash kernels run on CPU and GPU. ``proj_out`` is zero-initialised, so a
    new block is the identity.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        channels: Channels ``C`` of the input and output.
        num_head_channels: Channels ``d`` per head; ``C`` must be divisible by it. ``None`` uses one
            head with ``d = C``.
        norm_num_groups: GroupNorm groups, clipped to divide ``C``.
        norm_eps: GroupNorm epsilon.
        include_fc: Keep the output projection ``proj_out``; ``False`` adds the attention output
            directly (MONAI's ``include_fc=False``).
        upcast: Compute the attention in float32 whatever the input dtype (MONAI's
            ``upcast_attention``).

    Shapes:
        ``(B, C, *spatial) -> (B, C, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_head_channels: int | None = None,
        norm_num_groups: int = 32,
        *,
        norm_eps: float = 1e-5,
        include_fc: bool = True,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}.")
        num_heads = num_heads_for(channels, num_head_channels)
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads

        conv = conv_nd(spatial_dims)
        self.upcast = bool(upcast)
        self.norm = get_norm_layer(
            ("group", {"num_groups": norm_num_groups, "eps": norm_eps}), spatial_dims, channels
        )
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj_out = zero_module(conv(channels, channels, 1)) if include_fc else None

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all positions of ``x``.

        Args:
            x: Input of shape ``(B, C, *spatial)``.

        Returns:
            ``x`` plus the attention output, shape ``(B, C, *spatial)``.
        """
        # Work on tokens (B, N, C) so that q, k and v are contiguous in the head dimension, which
        # the fused (flash) SDPA kernels need; the 1x1 convolutions become linear layers with the
        # same weights (a view), so checkpoints are unchanged.
        tokens = rearrange(self.norm(x), "b c ... -> b (...) c")
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = rearrange(
            qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        ).unbind(0)
        out = rearrange(attend(q, k, v, self.upcast), "b h n d -> b n (h d)")
        if self.proj_out is not None:
            out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(x.shape)
