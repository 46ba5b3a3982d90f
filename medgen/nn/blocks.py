"""Residual and convolutional building blocks shared by every net in :mod:`medgen.nets`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import (
    ActSpec,
    NormSpec,
    check_spatial_dims,
    conv_nd,
    get_act_layer,
    get_norm_layer,
)
from medgen.nn.fused import norm_act

__all__ = ["ConvBlock", "ResBlock", "resolve_norm", "zero_module"]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return it.

    Used for the last layer of residual branches so that a freshly built block is the identity
    (Goyal et al., 2017; used in ADM / LDM style UNets).
    """
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def resolve_norm(norm: NormSpec, norm_num_groups: int) -> NormSpec:
    """Fill in ``num_groups`` for a plain ``"group"`` norm name.

    Args:
        norm: Normalisation spec as accepted by :func:`~medgen.nn.factories.get_norm_layer`.
        norm_num_groups: Number of groups used when ``norm`` is the bare name ``"group"``.

    Returns:
        ``("group", {"num_groups": norm_num_groups})`` for ``"group"``, else ``norm`` unchanged.
    """
    if isinstance(norm, str) and norm.lower().replace("_", "") in ("group", "groupnorm"):
        return ("group", {"num_groups": norm_num_groups})
    return norm


class ConvBlock(nn.Module):
    """Pre-activation convolution: norm → act → conv.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Convolution kernel size (odd; padded to keep the spatial size).
        norm: Normalisation spec (see :func:`~medgen.nn.factories.get_norm_layer`).
        norm_num_groups: Groups for ``norm="group"``.
        act: Activation spec (see :func:`~medgen.nn.factories.get_act_layer`).

    Shapes:
        ``(B, C_in, *spatial) -> (B, C_out, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        norm: NormSpec = "group",
        norm_num_groups: int = 32,
        act: ActSpec = "silu",
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.norm = get_norm_layer(resolve_norm(norm, norm_num_groups), spatial_dims, in_channels)
        self.act = get_act_layer(act)
        self.conv = conv_nd(spatial_dims)(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply norm, activation and convolution.

        Args:
            x: Input of shape ``(B, C_in, *spatial)``.

        Returns:
            Output of shape ``(B, C_out, *spatial)``.
        """
        return self.conv(norm_act(self.norm, self.act, x))


class ResBlock(nn.Module):
    """Residual block with an optional conditioning embedding (ADM / LDM style).

    The residual branch is ``norm → act → conv3x3 → [embedding] → norm → act → dropout → conv3x3``.
    The embedding (e.g. a timestep embedding) is projected by ``act → linear`` and injected either
    as a FiLM-style scale and shift after the second norm (``h = norm(h) * (1 + scale) + shift``,
    Dhariwal & Nichol 2021, "adaptive group normalisation") or added to ``h`` before the second norm.
    The last convolution is zero-initialised so that a new block is its skip connection; the skip
    is a 1x1 convolution when the channel count changes and the identity otherwise.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``; defaults to ``in_channels``.
        emb_channels: Size ``E`` of the conditioning embedding, or ``None`` for no embedding.
        norm: Normalisation spec (see :func:`~medgen.nn.factories.get_norm_layer`).
        norm_num_groups: Groups used when ``norm == "group"``; clipped to divide the channels.
        act: Activation spec (see :func:`~medgen.nn.factories.get_act_layer`).
        dropout: Dropout probability before the last convolution.
        scale_shift: Inject the embedding as scale and shift (``True``) or by addition (``False``).
        resample: ``"down"`` (2x average pooling) or ``"up"`` (2x nearest) applied to both the
            skip input and the branch after its first norm and activation, as the BigGAN / ADM
            up- and down-sampling ResBlocks (Brock et al., 2019; Dhariwal & Nichol, 2021) and
            MONAI's ``resblock_updown``; ``None`` keeps the resolution.

    Shapes:
        ``x``: ``(B, C_in, *spatial)``; ``emb``: ``(B, E)``; output ``(B, C_out, *spatial)``, with
        the spatial size halved or doubled by ``resample``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        norm: NormSpec = "group",
        norm_num_groups: int = 32,
        act: ActSpec = "silu",
        dropout: float = 0.0,
        scale_shift: bool = True,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}.")
        self.resample = resample
        out_channels = in_channels if out_channels is None else out_channels
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.scale_shift = bool(scale_shift)

        norm = resolve_norm(norm, norm_num_groups)
        conv = conv_nd(spatial_dims)
        self.norm1 = get_norm_layer(norm, spatial_dims, in_channels)
        self.act1 = get_act_layer(act)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)

        if emb_channels is not None:
            emb_out = 2 * out_channels if self.scale_shift else out_channels
            self.emb_proj: nn.Module | None = nn.Sequential(
                get_act_layer(act), nn.Linear(emb_channels, emb_out)
            )
        else:
            self.emb_proj = None

        self.norm2 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act2 = get_act_layer(act)
        # nn.Dropout(0) would still draw and store a mask in training; skip it entirely.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_module(conv(out_channels, out_channels, 3, padding=1))

        if in_channels != out_channels:
            self.skip: nn.Module = conv(in_channels, out_channels, 1)
        else:
            self.skip = nn.Identity()

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2) if self.spatial_dims == 2 else F.avg_pool3d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """Apply the residual block.

        Args:
            x: Input of shape ``(B, C_in, *spatial)``.
            emb: Conditioning embedding of shape ``(B, E)``; required iff ``emb_channels`` was set.

        Returns:
            Output of shape ``(B, C_out, *spatial)``.

        Raises:
            ValueError: If ``emb`` is given without ``emb_channels`` or missing when it is needed.
        """
        h = norm_act(self.norm1, self.act1, x)
        if self.resample is not None:
            h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        if self.emb_proj is None:
            if emb is not None:
                raise ValueError("ResBlock was built with emb_channels=None but got an embedding.")
            h = norm_act(self.norm2, self.act2, h)
        else:
            if emb is None:
                raise ValueError(
                    f"ResBlock was built with emb_channels={self.emb_channels}; pass `emb`."
                )
            e = self.emb_proj(emb.to(h.dtype))  # (B, E')
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = norm_act(self.norm2, self.act2, h, scale, shift)
            else:
                h = norm_act(
                    self.norm2, self.act2, h + e.reshape(e.shape + (1,) * self.spatial_dims)
                )
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h
