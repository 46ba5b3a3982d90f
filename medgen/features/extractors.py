"""Feature extractors for distribution metrics: ``(B, C, *spatial)`` images to ``(B, F)`` features.

Nothing here downloads.

- :class:`PixelFeatures`: average-pooled pixels, a transparent baseline with no learned weights.
- :class:`RandomConvFeatures`: a small conv net with fixed random weights drawn from a seed; it is
  sensitive to texture and needs no file, which makes it the extractor for tests and for data far
  from natural images where ImageNet features mean little.
- :class:`TorchvisionFeatures`: Inception-v3 or ResNet-50 pool features from a torchvision state
  dict on local disk (checked by SHA-256 when given), read by :mod:`medgen.features.weights`.

They are used by :mod:`medgen.metrics.fidelity` (FID, KID, RBF-MMD) and can be passed to
``torchmetrics.image.FrechetInceptionDistance(feature=extractor)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.features.imagenet import imagenet_mean_std
from medgen.features.weights import load_state_dict, local_weights_file, offline_instructions

__all__ = [
    "FrozenBackbone",
    "PixelFeatures",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "rgb_images",
]


def _check_image_batch(x: Tensor) -> int:
    if not isinstance(x, Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W) images, got {shape}")
    return x.ndim - 2


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


def rgb_images(x: Tensor, who: str) -> Tensor:
    """Check ``(B, C, H, W)`` images and return them as float RGB.

    Gray is repeated to three channels; other channel counts than 1 and 3 are averaged to gray
    first.

    Raises:
        ValueError: not a 4D tensor; the message names ``who``.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects (B, C, H, W) images, got {shape}")
    x = _as_float(x)
    if x.shape[1] != 3:
        x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return x


class FrozenBackbone(nn.Module):
    """Base of the pretrained extractors: ``self.net`` stays in eval mode, without gradients."""

    net: nn.Module

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Keep the backbone in eval mode whatever the parent module does."""
        super().train(mode)
        self.net.eval()
        return self


class PixelFeatures(nn.Module):
    """Average-pooled pixels as features: a transparent baseline.

    Channels are averaged to one, the image is adaptively average-pooled to ``size`` per spatial
    axis and flattened, so ``F = size**2`` for images and ``size**3`` for volumes.

    Args:
        size: pooled side length.
    """

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, *spatial)`` to ``(B, size**spatial_dims)``."""
        dims = _check_image_batch(x)
        gray = _as_float(x).mean(dim=1, keepdim=True)
        pool = F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool3d
        return pool(gray, self.size).flatten(1)


class RandomConvFeatures(nn.Module):
    """A fixed random-weight conv net: deterministic, texture-sensitive features without a download.

    Three stride-2 3x3(x3) convolutions with leaky ReLU (widths ``width``, ``2 width``,
    ``4 width``); the features are the spatial mean and standard deviation of every channel of the
    last layer, so ``F = 8 width``. Weights are He-normal draws from ``torch.Generator`` seeded with
    ``seed`` and never change (no gradients, no normalisation layers), so the same seed gives the
    same features on any machine and in any process. Random conv features are a known useful
    texture statistic (Ulyanov et al., "Deep image prior", CVPR 2018; He, Wang, Hopcroft, "A
    powerful generative model using random weights for the deep image representation", NeurIPS
    2016).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels the first layer expects; single-channel input is repeated to it,
            and any input is averaged to one channel when ``in_channels == 1``.
        seed: weight seed.
        width: channels of the first layer.
    """

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, seed: int = 0, width: int = 64
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.seed = seed
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        widths = [in_channels, width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(
            conv(c_in, c_out, kernel_size=3, stride=2, padding=1)
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        generator = torch.Generator().manual_seed(seed)
        for layer in self.convs:
            fan_in = layer.weight[0].numel()
            std = math.sqrt(2.0 / fan_in)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
        self.requires_grad_(False)
        self.num_features = 2 * widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, *spatial)`` to ``(B, 8 * width)``."""
        dims = _check_image_batch(x)
        if dims != self.spatial_dims:
            raise ValueError(f"expected {self.spatial_dims}D images, got shape {tuple(x.shape)}")
        x = _as_float(x).to(self.convs[0].weight.dtype)
        c = x.shape[1]
        if c != self.in_channels:
            if self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif c == 1:
                x = x.expand(-1, self.in_channels, *x.shape[2:])
            else:
                raise ValueError(f"expected 1 or {self.in_channels} channels, got {c}")
        for layer in self.convs:
            x = F.leaky_relu(layer(x), 0.2)
        flat = x.flatten(2)
        return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)


_TORCHVISION_ARCHS = {
    # arch: (input size, feature width, official weights URL)
    "inception_v3": (
        299,
        2048,
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    ),
    "resnet50": (224, 2048, "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
}


class TorchvisionFeatures(nn.Module):
    """Pool features of a torchvision Inception-v3 or ResNet-50 loaded from a local file.

    Inputs are ``(B, C, H, W)`` images with intensities in ``[0, 1]``; gray is repeated to RGB
    (other channel counts are averaged to gray first), the image is resized bilinearly (with
    antialiasing) to 299 (Inception) or 224 (ResNet) and normalised with the ImageNet mean and std.
    Output: the 2048 features before the classifier. Volumes ``(B, C, D, H, W)`` go through the
    net slice-wise on the three central planes (axial, coronal, sagittal in array order), and the
    three feature vectors are concatenated, ``F = 3 * 2048``.

    The backbone stays in eval mode (its batch-norm statistics never change) and has no gradients.

    Args:
        arch: ``"inception_v3"`` or ``"resnet50"``.
        weights_path: torchvision state dict (``torch.save``) or ``.safetensors`` file. Loaded with
            ``torch.load(..., weights_only=True)``: nothing is unpickled beyond tensors.
        sha256: expected SHA-256 of the file; checked when given.

    Raises:
        FileNotFoundError: the file is missing (the message says how to get it offline).
        ValueError: SHA-256 mismatch, a file that cannot be read as a state dict, or a state dict
            that does not fit the architecture (the message names the file).
    """

    def __init__(
        self,
        arch: str = "inception_v3",
        weights_path: str | Path | None = None,
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        if arch not in _TORCHVISION_ARCHS:
            raise ValueError(f"arch must be one of {sorted(_TORCHVISION_ARCHS)}, got {arch!r}")
        self.arch = arch
        self.input_size, self.num_features, url = _TORCHVISION_ARCHS[arch]
        how = offline_instructions(arch, url)
        path = local_weights_file(weights_path, arch, how, sha256=sha256)
        state = load_state_dict(path)

        import torchvision

        if arch == "inception_v3":
            aux = any(k.startswith("AuxLogits.") for k in state)
            # transform_input=True: torchvision's port expects ImageNet-normalised input and maps
            # it to the (x - 0.5) / 0.5 scaling the original Google weights were trained with.
            net = torchvision.models.inception_v3(
                weights=None, aux_logits=aux, transform_input=True, init_weights=False
            )
        else:
            net = torchvision.models.resnet50(weights=None)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a torchvision {arch} state dict: {exc}") from exc
        net.fc = nn.Identity()
        self.net = net.eval().requires_grad_(False)
        mean, std = imagenet_mean_std()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def train(self, mode: bool = True) -> TorchvisionFeatures:
        """Keep the backbone in eval mode whatever the parent module does."""
        super().train(mode)
        self.net.eval()
        return self

    def _features_2d(self, x: Tensor) -> Tensor:
        x = _as_float(x).to(self.mean.dtype)
        if x.shape[1] != 3:
            x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        size = (self.input_size, self.input_size)
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, H, W)`` to ``(B, 2048)`` or ``(B, C, D, H, W)`` to ``(B, 6144)``."""
        dims = _check_image_batch(x)
        if dims == 2:
            return self._features_2d(x)
        d, h, w = x.shape[2:]
        planes = (x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2])
        return torch.cat([self._features_2d(p) for p in planes], dim=1)
