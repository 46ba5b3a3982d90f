"""Perceptual (feature) losses with VGG features from local weights; Gram matrices for style.

- :class:`VGGFeatures`: intermediate feature maps of torchvision's VGG-16 / VGG-19 ``features``
  stack, loaded from a torchvision state dict on local disk (checked by SHA-256 when given).
  Nothing downloads; :meth:`VGGFeatures.random` gives random weights for tests.
- :class:`PerceptualLoss`: distance between VGG features of a prediction and a target for 2D
  images, and a 2.5D version for volumes (random slices along each axis). Without weights it is
  *disabled* (returns 0, with one warning at construction) rather than silently using a random
  network.
- :func:`gram_matrix`: channel Gram matrices of feature maps (style statistics).

References:
    Simonyan, Zisserman. "Very deep convolutional networks for large-scale image recognition."
    ICLR 2015 (VGG; configurations D = VGG-16 and E = VGG-19, Table 1).
    Gatys, Ecker, Bethge. "Image style transfer using convolutional neural networks." CVPR 2016
    (Gram matrix, Eq. 3; style loss, Eq. 4-5).
    Johnson, Alahi, Fei-Fei. "Perceptual losses for real-time style transfer and
    super-resolution." ECCV 2016 (feature reconstruction loss, Eq. 2).
    Zhang, Isola, Efros, Shechtman, Wang. "The unreasonable effectiveness of deep features as a
    perceptual metric." CVPR 2018 (LPIPS: channel-wise unit normalisation, Eq. 1).
    Khader et al. "Denoising diffusion probabilistic models for 3D medical image generation."
    Scientific Reports 13, 2023 (Medical Diffusion: 2D perceptual loss on random slices of
    volumes); MONAI ``PerceptualLoss(is_fake_3d=True)`` uses slices along all three axes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from medgen.metrics.fidelity import _IMAGENET_MEAN, _IMAGENET_STD, _load_state_dict, _sha256

__all__ = ["DEFAULT_LAYERS", "PerceptualLoss", "VGGFeatures", "gram_matrix", "resolve_layer"]

logger = logging.getLogger(__name__)

#: Layers used by default: the ReLU outputs Johnson et al. 2016 use for style (VGG-16), which are
#: also the first four of LPIPS-VGG's five.
DEFAULT_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")

LayerSpec = str | int

_VGG_WIDTHS = (64, 128, 256, 512, 512)
#: convolutions per block: torchvision.models.vgg.cfgs "A", "B", "D", "E" (Simonyan & Zisserman,
#: Table 1), kept here so that names resolve without building a model
_VGG_BLOCKS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2,) * 5,
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
_VGG_CONFIGS = {
    arch: tuple(v for n, w in zip(blocks, _VGG_WIDTHS, strict=True) for v in (*([w] * n), "M"))
    for arch, blocks in _VGG_BLOCKS.items()
}
_SUPPORTED_ARCHS = ("vgg16", "vgg19")
_VGG_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}


def _check_arch(arch: str) -> None:
    if arch not in _SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {_SUPPORTED_ARCHS}, got {arch!r}")


def _layer_table(arch: str) -> dict[str, int]:
    """Map VGG names (``convX_Y``, ``reluX_Y``, ``poolX``) and Keras aliases to ``features`` indices."""
    table: dict[str, int] = {}
    index, block, conv = 0, 1, 0
    for value in _VGG_CONFIGS[arch]:
        if value == "M":
            table[f"pool{block}"] = index
            table[f"block{block}_pool"] = index
            index += 1
            block += 1
            conv = 0
        else:
            conv += 1
            table[f"conv{block}_{conv}"] = index
            # Keras' blockX_convY is the layer COMI and others name; mapped to the conv output.
            table[f"block{block}_conv{conv}"] = index
            table[f"relu{block}_{conv}"] = index + 1
            index += 2
    return table


def _num_layers(arch: str) -> int:
    return sum(1 if v == "M" else 2 for v in _VGG_CONFIGS[arch])


def _expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``features`` state dict (keys ``N.weight`` / ``N.bias``) of a VGG."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, channels = 0, 3
    for value in _VGG_CONFIGS[arch]:
        if value == "M":
            index += 1
            continue
        shapes[f"{index}.weight"] = (int(value), channels, 3, 3)
        shapes[f"{index}.bias"] = (int(value),)
        channels = int(value)
        index += 2
    return shapes


def resolve_layer(arch: str, layer: LayerSpec) -> int:
    """Index into ``torchvision.models.<arch>(weights=None).features`` of a named layer.

    Args:
        arch: ``"vgg16"`` or ``"vgg19"``.
        layer: ``"convX_Y"`` (convolution output, before its ReLU), ``"reluX_Y"``, ``"poolX"``,
            the Keras aliases ``"blockX_convY"`` (= ``convX_Y``) and ``"blockX_pool"``, or an
            integer index (an ``int`` or a string of digits).

    Returns:
        The index ``i``; the feature map is the output of ``features[i]``.

    Raises:
        ValueError: an unknown name or an index out of range (the message lists valid names).
    """
    _check_arch(arch)
    table = _layer_table(arch)
    count = _num_layers(arch)
    index: int | None = None
    if isinstance(layer, bool):
        index = None
    elif isinstance(layer, int):
        index = layer
    elif isinstance(layer, str):
        index = int(layer) if layer.isdigit() else table.get(layer)
    if index is None or not 0 <= index < count:
        vgg_names = [n for n in table if not n.startswith("block")]
        raise ValueError(
            f"unknown {arch} layer {layer!r}; valid names: {', '.join(vgg_names)}; Keras aliases "
            f"blockX_convY (= convX_Y) and blockX_pool (= poolX); or an integer index 0..{count - 1} "
            "into torchvision's features"
        )
    return index


def _build_features(arch: str) -> nn.Sequential:
    """``torchvision.models.<arch>(weights=None).features`` without building the classifier.

    Same modules and indices as torchvision's (``make_layers`` of the same configuration); the
    ReLUs are made out-of-place so that a conv output we return is not overwritten by the next
    layer.
    """
    try:  # module-level helpers of torchvision.models.vgg: no classifier (~120M parameters)
        from torchvision.models.vgg import cfgs, make_layers

        letter = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[arch]
        features = make_layers(cfgs[letter], batch_norm=False)
    except (ImportError, KeyError):  # pragma: no cover - a torchvision without these helpers
        import torchvision

        features = getattr(torchvision.models, arch)(weights=None).features
    for module in features:
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return features


def _guess_arch(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    for arch in _VGG_CONFIGS:
        if dict(shapes) == _expected_shapes(arch):
            return arch
    return None


def _features_state(state: Mapping[str, Tensor], path: Path, arch: str) -> dict[str, Tensor]:
    """The ``features`` part of a VGG state dict, checked key by key against ``arch``."""
    feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not feats and state and all(k.split(".", 1)[0].isdigit() for k in state):
        feats = dict(state)  # a state dict of the ``features`` Sequential itself
    if not feats:
        some = ", ".join(list(state)[:4]) or "none"
        raise ValueError(
            f"{path}: not a torchvision VGG state dict: no 'features.N.weight' keys (keys: {some})"
        )
    if any("running_mean" in k for k in feats):
        raise ValueError(
            f"{path}: a batch-norm VGG state dict (running_mean keys); medgen uses torchvision's "
            f"plain {arch}, not {arch}_bn"
        )
    shapes = {k: tuple(v.shape) for k, v in feats.items() if isinstance(v, Tensor)}
    guess = _guess_arch(shapes)
    hint = f" (the file looks like a {guess} state dict)" if guess and guess != arch else ""
    expected = _expected_shapes(arch)
    for key, shape in expected.items():
        if key not in shapes:
            raise ValueError(
                f"{path}: not a torchvision {arch} state dict: missing key 'features.{key}' "
                f"(expected shape {shape}){hint}"
            )
        if shapes[key] != shape:
            raise ValueError(
                f"{path}: key 'features.{key}' has shape {shapes[key]}, but {arch} expects "
                f"{shape}{hint}"
            )
    extra = [k for k in feats if k not in expected]
    if extra:
        raise ValueError(
            f"{path}: not a torchvision {arch} state dict: unexpected key 'features.{extra[0]}'"
            f"{hint}"
        )
    return feats


def _missing_weights_message(arch: str) -> str:
    return (
        f"medgen never downloads; on a machine with internet download {_VGG_URLS[arch]} (or run "
        f"`torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), "
        f"'{arch}.pth')`), copy the file here and pass its path as weights_path (the 8 hex digits "
        "in the official file name are the start of its SHA-256)"
    )


class VGGFeatures(nn.Module):
    """Frozen VGG-16/19 feature maps from a local torchvision state dict.

    The backbone is ``torchvision.models.<arch>(weights=None).features`` (Simonyan & Zisserman
    2015) truncated after the deepest requested layer. Inputs ``(B, C, H, W)`` with intensities in
    ``value_range`` are mapped to ``[0, 1]``; gray (``C = 1``) is repeated to RGB, any other
    ``C != 3`` is averaged to gray first; then the ImageNet mean and std are applied. The weights
    never change (``requires_grad=False``) and the module always stays in eval mode, but gradients
    flow to the input, as perceptual losses (Johnson et al. 2016) and style transfer (Gatys et al.
    2016) need.

    Layer names follow VGG: ``convX_Y`` is the output of the Y-th convolution of block X (before
    its ReLU), ``reluX_Y`` the same after the ReLU, ``poolX`` the block's max-pool. The Keras names
    ``blockX_convY`` (used e.g. by COMI) map to ``convX_Y``: note that Keras' own layer includes
    the ReLU, so use ``reluX_Y`` to reproduce Keras features exactly. Integer indices address
    ``features`` directly (torchvision layout; e.g. for VGG-19, 0 = conv1_1, 5 = conv2_1,
    10 = conv3_1).

    Args:
        arch: ``"vgg16"`` or ``"vgg19"``.
        weights_path: torchvision VGG state dict: a full model's (``classifier.*`` keys are
            ignored) or the ``features`` part only; ``.pth`` loaded with
            ``torch.load(..., weights_only=True)``, or ``.safetensors``.
        sha256: expected SHA-256 of the file; checked when given.
        layers: layers to return, by name or index (see above).
        value_range: ``(low, high)`` intensities of the input, mapped to ``[0, 1]``.

    Raises:
        FileNotFoundError: no file (the message says how to obtain it offline).
        ValueError: SHA-256 mismatch, a file that is not a plain ``arch`` state dict (the message
            names the key and shapes), an unknown layer or a bad value range.

    Example:
        >>> vgg = VGGFeatures("vgg19", "/models/vgg19-dcbb9e9d.pth", layers=("relu2_2",))
        >>> vgg(torch.rand(2, 1, 64, 64))["relu2_2"].shape
        torch.Size([2, 128, 32, 32])
    """

    def __init__(
        self,
        arch: str = "vgg19",
        weights_path: str | Path | None = None,
        sha256: str | None = None,
        layers: Sequence[LayerSpec] = DEFAULT_LAYERS,
        value_range: tuple[float, float] = (0.0, 1.0),
        *,
        _random_seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_arch(arch)
        if isinstance(layers, str | int):
            layers = (layers,)
        layers = tuple(dict.fromkeys(layers))
        if not layers:
            raise ValueError("layers must name at least one layer")
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.arch = arch
        self.layers: tuple[LayerSpec, ...] = layers
        self.indices: tuple[int, ...] = tuple(resolve_layer(arch, layer) for layer in layers)
        self.value_range = (low, high)
        self.is_random = _random_seed is not None

        if self.is_random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(_random_seed))
                full = _build_features(arch)
                # torchvision's VGG initialisation (VGG.__init__ with init_weights=True)
                for module in full:
                    if isinstance(module, nn.Conv2d):
                        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(module.bias)
        else:
            full = self._load(arch, weights_path, sha256)
        self.features = full[: max(self.indices) + 1]
        self.features.eval().requires_grad_(False)
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load(arch: str, weights_path: str | Path | None, sha256: str | None) -> nn.Sequential:
        how = _missing_weights_message(arch)
        if weights_path is None or str(weights_path) == "":
            raise FileNotFoundError(
                f"no weights_path given for {arch}: {how}; for tests only, VGGFeatures.random() "
                "gives random weights"
            )
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {arch} weights file not found: {how}")
        if sha256 is not None:
            actual = _sha256(path)
            if actual.lower() != sha256.lower():
                raise ValueError(f"{path}: SHA-256 mismatch: expected {sha256}, file has {actual}")
        try:
            state = _load_state_dict(path)
        except ValueError:
            raise
        except Exception as exc:  # corrupt file, pickle refused by weights_only, bad safetensors
            raise ValueError(f"{path}: cannot read a state dict: {exc}") from exc
        feats = _features_state(state, path, arch)
        full = _build_features(arch)
        full.load_state_dict(feats, strict=True)
        return full

    @classmethod
    def random(
        cls,
        arch: str = "vgg19",
        layers: Sequence[LayerSpec] = DEFAULT_LAYERS,
        seed: int = 0,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> VGGFeatures:
        """A VGG with random weights (torchvision's initialisation, seeded): for tests only.

        The features of a random network are not perceptual features; use this for tests and
        offline checks of shapes and gradients, never for training. The global RNG is left as
        it was.

        Args:
            arch: ``"vgg16"`` or ``"vgg19"``.
            layers: layers to return.
            seed: weight seed; the same seed gives the same weights.
            value_range: ``(low, high)`` intensities of the input.

        Returns:
            The extractor, with ``is_random`` True.
        """
        logger.warning(
            "VGGFeatures.random(%s, seed=%d): features come from RANDOM weights; use only for tests "
            "and offline checks",
            arch,
            seed,
        )
        return cls(arch, layers=layers, value_range=value_range, _random_seed=seed)

    def train(self, mode: bool = True) -> VGGFeatures:
        """Keep the backbone in eval mode whatever the parent module does."""
        super().train(mode)
        self.features.eval()
        return self

    def resolve(
        self, layers: Sequence[LayerSpec] | None = None
    ) -> tuple[tuple[LayerSpec, ...], tuple[int, ...]]:
        """Check ``layers`` against this extractor and return them with their indices.

        Any layer up to the depth the backbone was truncated at can be computed, not only those
        given at construction.

        Args:
            layers: layer names or indices; default: the constructor's ``layers``.

        Returns:
            ``(layers, indices)`` with duplicates removed, in the given order.

        Raises:
            ValueError: an unknown layer, or one deeper than the truncated backbone.
        """
        if layers is None:
            return self.layers, self.indices
        if isinstance(layers, str | int):
            layers = (layers,)
        layers = tuple(dict.fromkeys(layers))
        if not layers:
            raise ValueError("layers must name at least one layer")
        indices = tuple(resolve_layer(self.arch, layer) for layer in layers)
        depth = len(self.features)
        too_deep = [layer for layer, i in zip(layers, indices, strict=True) if i >= depth]
        if too_deep:
            raise ValueError(
                f"layers {too_deep} are deeper than this extractor, whose backbone stops after "
                f"features[{depth - 1}] (its deepest requested layer); build VGGFeatures with "
                "layers that include them"
            )
        return layers, indices

    def forward(
        self, x: Tensor, layers: Sequence[LayerSpec] | None = None
    ) -> dict[LayerSpec, Tensor]:
        """Map ``(B, C, H, W)`` images to ``{layer: (B, C_l, H_l, W_l)}``.

        Args:
            x: images with intensities in ``value_range``.
            layers: layers to return instead of the constructor's (see :meth:`resolve`).

        Returns:
            Feature maps keyed by layer as given, in the order of ``layers``.
        """
        layers, indices = self.resolve(layers)
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"VGGFeatures expects (B, C, H, W) images, got {shape}; for volumes use "
                "PerceptualLoss(spatial_dims=3), which works on slices"
            )
        x = x.to(self.mean.dtype)
        low, high = self.value_range
        if (low, high) != (0.0, 1.0):
            x = (x - low) / (high - low)
        if x.shape[1] != 3:
            if x.shape[1] != 1:
                x = x.mean(dim=1, keepdim=True)
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        wanted: dict[int, list[LayerSpec]] = {}
        for layer, index in zip(layers, indices, strict=True):
            wanted.setdefault(index, []).append(layer)
        found: dict[LayerSpec, Tensor] = {}
        last = max(indices)
        for index, module in enumerate(self.features):
            if index > last:
                break
            x = module(x)
            for layer in wanted.get(index, ()):
                found[layer] = x
        return {layer: found[layer] for layer in layers}

    def extra_repr(self) -> str:
        random = ", random weights" if self.is_random else ""
        return f"arch={self.arch!r}, layers={self.layers}, value_range={self.value_range}{random}"


def gram_matrix(features: Tensor) -> Tensor:
    """Channel Gram matrices of feature maps, normalised by the number of elements.

    ``G_ij = sum_k F_ik F_jk / (C N)`` with ``F`` the ``(C, N)`` matrix of a feature map flattened
    over its ``N`` positions (Gatys et al. 2016, Eq. 3; dividing by ``C N`` as is usual makes the
    scale independent of the layer size, which the ``1 / (4 N^2 M^2)`` of Eq. 4 also does).

    Args:
        features: ``(B, C, *spatial)`` feature maps (2D or 3D).

    Returns:
        ``(B, C, C)`` Gram matrices, in at least float32.
    """
    if not isinstance(features, Tensor) or features.ndim < 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"gram_matrix expects (B, C, *spatial) features, got {shape}")
    flat = features.flatten(2)
    if flat.dtype in (torch.float16, torch.bfloat16) or not flat.is_floating_point():
        flat = flat.float()
    c, n = flat.shape[1], flat.shape[2]
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * n)


_NORM_EPS = 1e-10  # LPIPS' eps in normalize_tensor


class PerceptualLoss(nn.Module):
    """VGG perceptual loss for images, and its 2.5D version for volumes.

    For each layer ``l`` the features ``f_l`` of prediction and target are compared per position;
    the distance is averaged over positions, summed over layers with ``layer_weights`` and
    averaged over the batch:

    - ``normalize=True`` (default): every feature vector is divided by its Euclidean norm over
      channels (LPIPS, Zhang et al. 2018, Eq. 1 with unit channel weights), and the per-position
      distance is the *sum* over channels of ``|diff|`` (``"l1"``) or ``diff^2`` (``"l2"``; then it
      lies in ``[0, 4]``).
    - ``normalize=False``: raw features and the *mean* over channels, i.e. Johnson et al. 2016,
      Eq. 2 (``"l2"``) or its L1 analogue.

    Volumes ``(B, C, D, H, W)`` (``mode="2.5d"``, the default for ``spatial_dims=3``): along each
    spatial axis in ``axes``, ``num_slices`` slice indices are drawn at random (without replacement,
    from torch's global RNG, fresh on every call; the same indices for prediction and target and for
    every sample of the batch), the 2D loss is computed on those slices, and the results are
    averaged over axes, as in Medical Diffusion (Khader et al. 2023; one axis) and MONAI's
    ``PerceptualLoss(is_fake_3d=True)`` (three axes).

    Without weights (``weights_path=None`` and no ``extractor``) the loss is **disabled**:
    ``enabled`` is False, one warning is issued at construction and ``forward`` returns a zero that
    is part of the graph (``pred.sum() * 0``), so ``loss.backward()`` works; a random network is
    never used silently.

    The extractor's weights are left out of :meth:`state_dict` (they come from the weights file,
    not from training), so checkpoints stay small and load whether or not the loss is enabled on
    the loading machine.

    Args:
        spatial_dims: 2 for ``(B, C, H, W)``, 3 for ``(B, C, D, H, W)``.
        arch: ``"vgg16"`` or ``"vgg19"``.
        weights_path: local torchvision VGG state dict (see :class:`VGGFeatures`).
        sha256: expected SHA-256 of ``weights_path``.
        layers: layers compared, default :data:`DEFAULT_LAYERS`; with ``extractor``, default its
            layers (any layer its truncated backbone reaches is allowed).
        layer_weights: one weight per layer (default 1 each).
        value_range: ``(low, high)`` input intensities, default ``(0, 1)``; with ``extractor``
            it must match the extractor's (default: the extractor's).
        mode: ``"2d"`` (images) or ``"2.5d"`` (volumes); default from ``spatial_dims``.
        num_slices: slices drawn per axis and call in 2.5D mode (capped at the axis length).
        normalize: unit-normalise feature vectors over channels (LPIPS-style).
        distance: ``"l1"`` or ``"l2"``.
        extractor: a prebuilt :class:`VGGFeatures` (e.g. ``VGGFeatures.random()`` in tests);
            ``arch``, ``weights_path`` and ``sha256`` are then unused.
        axes: spatial axes sliced in 2.5D mode (0 = D, 1 = H, 2 = W).

    Example:
        >>> loss_fn = PerceptualLoss(3, weights_path="/models/vgg19-dcbb9e9d.pth", num_slices=2)
        >>> loss = loss_fn(fake_volumes, real_volumes)  # scalar
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        arch: str = "vgg19",
        weights_path: str | Path | None = None,
        sha256: str | None = None,
        layers: Sequence[LayerSpec] | None = None,
        layer_weights: Sequence[float] | None = None,
        value_range: tuple[float, float] | None = None,
        mode: str | None = None,
        num_slices: int = 1,
        normalize: bool = True,
        distance: str = "l1",
        extractor: VGGFeatures | None = None,
        axes: Sequence[int] = (0, 1, 2),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        mode = mode if mode is not None else ("2d" if spatial_dims == 2 else "2.5d")
        expected_mode = "2d" if spatial_dims == 2 else "2.5d"
        if mode != expected_mode:
            raise ValueError(
                f"mode={mode!r} does not fit spatial_dims={spatial_dims}: use '2d' for images and "
                "'2.5d' (random slices) for volumes"
            )
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
        if int(num_slices) != num_slices or num_slices < 1:
            raise ValueError(f"num_slices must be a positive integer, got {num_slices!r}")
        axes = tuple(int(a) for a in axes)
        if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct values among 0, 1, 2, got {axes}")
        self.spatial_dims = spatial_dims
        self.mode = mode
        self.num_slices = int(num_slices)
        self.normalize = bool(normalize)
        self.distance = distance
        self.axes = axes

        if extractor is not None:
            if not isinstance(extractor, VGGFeatures):
                raise TypeError(f"extractor must be a VGGFeatures, got {type(extractor).__name__}")
            layers, _ = extractor.resolve(layers)
            if value_range is not None and tuple(map(float, value_range)) != extractor.value_range:
                raise ValueError(
                    f"value_range {tuple(value_range)} differs from the extractor's "
                    f"{extractor.value_range}; build the extractor with the range you need"
                )
        else:
            _check_arch(arch)
            layers = DEFAULT_LAYERS if layers is None else tuple(dict.fromkeys(layers))
            value_range = (0.0, 1.0) if value_range is None else value_range
            if weights_path is not None and str(weights_path) != "":
                extractor = VGGFeatures(arch, weights_path, sha256, layers, value_range)
            else:
                for layer in layers:  # validate names even when disabled
                    resolve_layer(arch, layer)
        if layer_weights is None:
            layer_weights = [1.0] * len(layers)
        if len(layer_weights) != len(layers):
            raise ValueError(
                f"layer_weights has {len(layer_weights)} entries for {len(layers)} layers"
            )
        self.layers: tuple[LayerSpec, ...] = tuple(layers)
        self.layer_weights: tuple[float, ...] = tuple(float(w) for w in layer_weights)
        self.extractor = extractor
        self.enabled = extractor is not None
        if not self.enabled:
            warnings.warn(
                "PerceptualLoss is disabled: no VGG weights were given (weights_path=None) and "
                "medgen never downloads, so the loss returns 0. To enable it, pass weights_path= "
                f"a local torchvision {arch} state dict ({_VGG_URLS[arch]} saved on a "
                "machine with internet).",
                stacklevel=2,
            )
        self.register_state_dict_post_hook(_drop_extractor_state)
        self.register_load_state_dict_pre_hook(_restore_extractor_state)

    def _loss_2d(self, pred: Tensor, target: Tensor) -> Tensor:
        assert self.extractor is not None
        if target.requires_grad:
            both = self.extractor(torch.cat([pred, target]), self.layers)
            feats_p = {k: v[: len(pred)] for k, v in both.items()}
            feats_t = {k: v[len(pred) :] for k, v in both.items()}
        else:
            feats_p = self.extractor(pred, self.layers)
            with torch.no_grad():
                feats_t = self.extractor(target, self.layers)
        total = pred.new_zeros(len(pred), dtype=torch.float32)
        for layer, weight in zip(self.layers, self.layer_weights, strict=True):
            fp, ft = feats_p[layer].float(), feats_t[layer].float()
            if self.normalize:
                fp = fp / (fp.norm(dim=1, keepdim=True) + _NORM_EPS)
                ft = ft / (ft.norm(dim=1, keepdim=True) + _NORM_EPS)
            diff = fp - ft
            per_position = diff.abs() if self.distance == "l1" else diff.square()
            per_position = per_position.sum(1) if self.normalize else per_position.mean(1)
            total = total + weight * per_position.flatten(1).mean(1)
        return total.mean()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Scalar loss between ``(B, C, *spatial)`` predictions and targets of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}"
            )
        if pred.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected (B, C, *spatial) with {self.spatial_dims} spatial dims, got shape "
                f"{tuple(pred.shape)}"
            )
        if not self.enabled:
            return pred.sum() * 0.0
        if self.spatial_dims == 2:
            return self._loss_2d(pred, target)
        losses = []
        for axis in self.axes:
            dim = 2 + axis
            size = pred.shape[dim]
            index = torch.randperm(size)[: min(self.num_slices, size)].to(pred.device)
            slices = []
            for volume in (pred, target):
                picked = volume.index_select(dim, index).movedim(dim, 1)  # (B, n, C, a, b)
                slices.append(picked.reshape(-1, *picked.shape[2:]))
            losses.append(self._loss_2d(*slices))
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        state = "enabled" if self.enabled else "DISABLED (no weights)"
        return (
            f"{state}, spatial_dims={self.spatial_dims}, mode={self.mode!r}, layers={self.layers}, "
            f"distance={self.distance!r}, normalize={self.normalize}"
        )


def _drop_extractor_state(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict
) -> None:
    """State-dict post-hook: the frozen extractor's weights come from its file, not checkpoints."""
    for key in [k for k in state_dict if k.startswith(prefix + "extractor.")]:
        del state_dict[key]


def _restore_extractor_state(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load pre-hook: the extractor keeps the weights of its file; extractor keys are ignored."""
    extractor_prefix = prefix + "extractor."
    for key in [k for k in state_dict if k.startswith(extractor_prefix)]:
        del state_dict[key]
    extractor = getattr(module, "extractor", None)
    if extractor is not None:
        state_dict.update(extractor.state_dict(prefix=extractor_prefix, keep_vars=True))
