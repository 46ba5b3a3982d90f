"""Distribution metrics for unpaired image sets: feature extractors, FID, KID and RBF-MMD.

Nothing here downloads. Three kinds of feature extractor map ``(B, C, *spatial)`` images to
``(B, F)`` features:

- :class:`PixelFeatures`: average-pooled pixels, a transparent baseline with no learned weights.
- :class:`RandomConvFeatures`: a small conv net with fixed random weights drawn from a seed; it is
  sensitive to texture and needs no file, which makes it the extractor for tests and for data far
  from natural images where ImageNet features mean little.
- :class:`TorchvisionFeatures`: Inception-v3 or ResNet-50 pool features from a torchvision state
  dict on local disk (checked by SHA-256 when given).

Distances work on any ``(N, F)`` features, in float64:

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to both sets (FID when
  the features are Inception pool features; Heusel et al. 2017).
- :func:`kernel_inception_distance`: unbiased MMD² with the cubic polynomial kernel, averaged over
  random subsets (KID; Bińkowski et al. 2018).
- :func:`mmd_rbf`: unbiased MMD² with a Gaussian kernel (Gretton et al. 2012).

Values computed with torchvision's Inception weights are *not* comparable to published FIDs, which
use the TF-Inception port of pytorch-fid / torch-fidelity; compare only numbers computed with the
same extractor and weights. For FID during DDP training, pass one of these extractors to
``torchmetrics.image.FrechetInceptionDistance(feature=extractor)``, which syncs the statistics.

References:
    Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. "GANs trained by a two time-scale update
    rule converge to a local Nash equilibrium." NeurIPS 2017 (FID, Eq. 6).
    Bińkowski, Sutherland, Arbel, Gretton. "Demystifying MMD GANs." ICLR 2018 (KID, Sec. 3 and
    Eq. 3 of Gretton et al. for the unbiased estimator).
    Gretton, Borgwardt, Rasch, Schölkopf, Smola. "A kernel two-sample test." JMLR 13, 2012.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PixelFeatures",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "frechet_distance",
    "kernel_inception_distance",
    "mmd_rbf",
]


def _check_image_batch(x: Tensor) -> int:
    if not isinstance(x, Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W) images, got {shape}")
    return x.ndim - 2


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


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
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
        ValueError: SHA-256 mismatch, or a state dict that does not fit the architecture.
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
        how = (
            f"medgen never downloads; on a machine with internet download {url} (or run "
            f"`torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), "
            "'weights.pth')`), copy the file here and pass its path as weights_path (the 8 hex "
            "digits in the official file name are the start of its SHA-256)"
        )
        if weights_path is None or str(weights_path) == "":
            raise FileNotFoundError(f"no weights_path given for {arch}: {how}")
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {arch} weights file not found: {how}")
        if sha256 is not None:
            actual = _sha256(path)
            if actual.lower() != sha256.lower():
                raise ValueError(f"{path}: SHA-256 mismatch: expected {sha256}, file has {actual}")
        state = _load_state_dict(path)

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
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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


def _as_features(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, F) features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_pair(a: Tensor, b: Tensor, minimum: int) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < minimum:
        raise ValueError(f"need at least {minimum} samples per set, got {len(a)} and {len(b)}")


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017).

    ``d² = |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` with unbiased covariances.
    The trace of the matrix square root is computed as ``tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` from
    symmetric eigendecompositions in float64: the same value (the two products are similar
    matrices), but symmetric, so no complex round-off as with a general ``sqrtm``. Tiny negative
    results from round-off are clamped to 0.

    Args:
        feats_a: ``(N_a, F)`` features.
        feats_b: ``(N_b, F)`` features.

    Returns:
        The distance as a Python float.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_pair(a, b, 2)
    if min(len(a), len(b)) <= a.shape[1]:
        warnings.warn(
            f"frechet_distance: {len(a)} and {len(b)} samples for {a.shape[1]} features; the "
            "covariances are singular and the estimate is strongly biased",
            stacklevel=2,
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return max(float(value), 0.0)


def _unbiased_mmd2(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> Tensor:
    m, n = k_xx.shape[0], k_yy.shape[0]
    term_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return term_x + term_y - 2 * k_xy.mean()


def kernel_inception_distance(
    feats_a: Tensor | np.ndarray,
    feats_b: Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with a polynomial kernel (Bińkowski et al. 2018).

    ``k(x, y) = (gamma x·y + coef0) ** degree`` with ``gamma = 1 / F`` by default (the cubic
    kernel of the paper). For each of ``subsets`` rounds, ``subset_size`` samples are drawn without
    replacement from each set and the unbiased MMD² estimate is computed; the result is the mean
    and the (population) standard deviation over rounds, as in torchmetrics and torch-fidelity.
    Sampling uses its own generator seeded with ``seed``. The unbiased estimate can be slightly
    negative when both sets come from one distribution.

    Args:
        feats_a: ``(N_a, F)`` features.
        feats_b: ``(N_b, F)`` features.
        subsets: number of random subsets.
        subset_size: samples per subset; reduced (with a warning) to ``min(N_a, N_b)``.
        degree: polynomial degree.
        gamma: kernel scale, default ``1 / F``.
        coef0: kernel offset.
        seed: subset sampling seed.

    Returns:
        ``(mean, std)`` as Python floats.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_pair(a, b, 2)
    if subsets < 1:
        raise ValueError(f"subsets must be positive, got {subsets}")
    size = min(subset_size, len(a), len(b))
    if size < subset_size:
        warnings.warn(
            f"kernel_inception_distance: subset_size={subset_size} exceeds the smaller set "
            f"({min(len(a), len(b))} samples); using {size}",
            stacklevel=2,
        )
    if size < 2:
        raise ValueError(f"subset_size must be at least 2, got {size}")
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)
    generator = torch.Generator().manual_seed(seed)

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (gamma * (x @ y.T) + coef0) ** degree

    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        values.append(_unbiased_mmd2(kernel(x, x), kernel(y, y), kernel(x, y)))
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std(unbiased=False))


def mmd_rbf(
    feats_a: Tensor | np.ndarray,
    feats_b: Tensor | np.ndarray,
    sigma: float | None = None,
) -> float:
    """Unbiased MMD² with a Gaussian kernel ``exp(-|x - y|² / (2 sigma²))`` (Gretton et al. 2012).

    Args:
        feats_a: ``(N_a, F)`` features.
        feats_b: ``(N_b, F)`` features.
        sigma: bandwidth; default: the median pairwise distance of the pooled samples (the median
            heuristic).

    Returns:
        The estimate as a Python float (may be slightly negative for equal distributions).
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_pair(a, b, 2)
    pooled = torch.cat([a, b])
    distances = torch.cdist(pooled, pooled).square()
    if sigma is None:
        upper = distances[torch.triu_indices(len(pooled), len(pooled), offset=1).unbind()]
        median = upper.median().sqrt()
        sigma = float(median) if median > 0 else 1.0
    k = torch.exp(-distances / (2 * float(sigma) ** 2))
    n = len(a)
    return float(_unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:]))
