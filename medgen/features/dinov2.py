"""DINOv2 ViT features from a local torch.hub-format weights file (no network, no torch.hub).

Stein et al. ("Exposing flaws of generative model evaluation metrics and their unfair treatment of
diffusion models", NeurIPS 2023) found the Fréchet distance in DINOv2 ViT-L/14 feature space to
agree with human judgement far better than FID on Inception features, and recommend it ("FD_DINOv2").
This module builds the DINOv2 vision transformer (Oquab et al., "DINOv2: learning robust visual
features without supervision", TMLR 2024) from its description so that the released backbone files
(``dinov2_vits14_pretrain.pth``, ``dinov2_vitb14_pretrain.pth``, ``dinov2_vitl14_pretrain.pth``,
``dinov2_vitg14_pretrain.pth`` and the ``*_reg4_pretrain.pth`` variants with register tokens) load
key for key:

- patch embedding: a 14x14 stride-14 convolution (``patch_embed.proj``);
- a class token (``cls_token``), optional register tokens (``register_tokens``, inserted after the
  class token, without position embedding), learned position embeddings for a 37x37 grid
  (``pos_embed``, the 518-pixel training resolution) resized bicubically to the input's grid;
- pre-norm blocks (LayerNorm eps 1e-6): multi-head attention with 64-dimensional heads
  (``attn.qkv``, ``attn.proj``) and an MLP (``mlp.fc1``/``mlp.fc2`` with GELU, or the SwiGLU
  ``mlp.w12``/``mlp.w3`` of ViT-g), each scaled by LayerScale (``ls1.gamma``, ``ls2.gamma``);
- a final LayerNorm (``norm``). The ``mask_token`` is only used in training and is ignored.

Width, depth, register count and MLP kind are read from the state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.features.extractors import FrozenBackbone, rgb_images
from medgen.features.imagenet import imagenet_mean_std
from medgen.features.resnets import load_into
from medgen.features.weights import load_state_dict, local_weights_file

__all__ = ["DINOv2Features", "DINOv2ViT", "dinov2_config"]

DINOV2_HOW = (
    "medgen never downloads; get the backbone file (e.g. dinov2_vitl14_pretrain.pth, "
    "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth, the file "
    "torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14') fetches) on a machine with "
    "internet, copy it here and pass its path as weights_path"
)


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _SwiGLU(dim, hidden) if swiglu else _MLP(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def dinov2_config(state: dict[str, Tensor]) -> dict[str, int | bool]:
    """Read ``embed_dim``, ``depth``, ``registers``, ``grid``, ``hidden``, ``swiglu`` from keys."""
    if "cls_token" not in state or "pos_embed" not in state:
        raise KeyError("cls_token/pos_embed")
    dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = int(
        state["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[
            1 if swiglu else 0
        ]
    )
    tokens = int(state["pos_embed"].shape[1]) - 1
    grid = int(round(tokens**0.5))
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    return {
        "embed_dim": dim,
        "depth": depth,
        "registers": registers,
        "grid": grid,
        "hidden": hidden,
        "swiglu": swiglu,
        "patch": patch,
    }


class DINOv2ViT(nn.Module):
    """The DINOv2 vision transformer backbone (see the module docstring).

    Args:
        embed_dim: token width (384 ViT-S, 768 ViT-B, 1024 ViT-L, 1536 ViT-g).
        depth: number of blocks (12, 12, 24, 40).
        registers: register tokens (0, or 4 for the ``_reg4`` files).
        grid: side of the position-embedding grid (37: 518 / 14).
        hidden: MLP width (``4 * embed_dim``; 4096 for ViT-g's SwiGLU).
        swiglu: SwiGLU MLP (ViT-g) instead of GELU.
        patch: patch size (14).

    Shapes:
        ``(B, 3, H, W)`` with ``H, W`` multiples of ``patch`` -> ``(B, embed_dim)``: the class
        token after the final norm.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        registers: int = 0,
        grid: int = 37,
        hidden: int | None = None,
        swiglu: bool = False,
        patch: int = 14,
    ) -> None:
        super().__init__()
        if embed_dim % 64:
            raise ValueError(f"embed_dim must be a multiple of 64, got {embed_dim}")
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, embed_dim))
        else:
            self.register_tokens = None
        hidden = 4 * embed_dim if hidden is None else hidden
        self.blocks = nn.ModuleList(
            _Block(embed_dim, embed_dim // 64, hidden, swiglu) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.embed_dim = embed_dim

    def _positions(self, h: int, w: int) -> Tensor:
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(round(grid_pos.shape[1] ** 0.5))
        if (h, w) != (side, side):
            grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
            grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 3, H, W)`` (ImageNet-normalised) to the ``(B, embed_dim)`` class token."""
        tokens = self.patch_embed.proj(x)
        h, w = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self._positions(h, w)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(len(x), -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class DINOv2Features(FrozenBackbone):
    """DINOv2 class-token features of 2D images in ``[0, 1]`` (FD_DINOv2, Stein et al. 2023).

    Gray is repeated to RGB (other channel counts are averaged to gray first), the image is resized
    bicubically (antialiased) to ``input_size`` (224, as in Stein et al.'s ``dgm-eval``; a multiple
    of 14), normalised with the ImageNet mean and std and passed through the backbone.

    Args:
        weights_path: a torch.hub-format backbone file (``dinov2_vitl14_pretrain.pth`` ...).
        sha256: expected SHA-256 of the file; checked when given.
        input_size: side the images are resized to.

    Shapes:
        ``(B, C, H, W)`` -> ``(B, embed_dim)`` (1024 for ViT-L/14).
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        sha256: str | None = None,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        path = local_weights_file(weights_path, "DINOv2 ViT", DINOV2_HOW, sha256=sha256)
        state = load_state_dict(path)
        try:
            config = dinov2_config(state)
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: not a DINOv2 backbone state dict (no {exc})") from exc
        if input_size % config["patch"]:
            raise ValueError(
                f"input_size must be a multiple of {config['patch']}, got {input_size}"
            )
        net = DINOv2ViT(**config)
        load_into(net, state, path, "DINOv2 ViT")
        self.net = net.eval().requires_grad_(False)
        self.input_size = int(input_size)
        self.num_features = net.embed_dim
        self.config = config
        mean, std = imagenet_mean_std()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, H, W)`` in ``[0, 1]`` to ``(B, embed_dim)``."""
        x = rgb_images(x, "DINOv2Features").to(self.mean.dtype)
        size = (self.input_size, self.input_size)
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)
