"""Frozen VGG-16 / VGG-19 feature maps from a local torchvision state dict.

:class:`VGGFeatures` is the extractor of the perceptual loss (:mod:`medgen.losses.perceptual`)
and of AGGrGAN's style loss; :func:`resolve_layer` maps VGG layer names (``relu2_2``, ``conv3_1``,
``pool4``, Keras' ``block1_conv2``) to indices into torchvision's ``features``. Nothing downloads:
the weights come from a file the user gives (:mod:`medgen.features.weights`), and
:meth:`VGGFeatures.random` gives seeded random weights for tests.

References:
    Simonyan, Zisserman. "Very deep convolutional networks for large-scale image recognition."
    ICLR 2015 (VGG; configurations D = VGG-16 and E = VGG-19, Table 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from medgen.features.imagenet import imagenet_mean_std
from medgen.features.weights import load_state_dict, local_weights_file, offline_instructions

__all__ = [
    "DEFAULT_LAYERS",
    "VGG_ARCHS",
    "VGG_URLS",
    "LayerSpec",
    "VGGFeatures",
    "check_vgg_arch",
    "resolve_layer",
]

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
#: The architectures :class:`VGGFeatures` supports.
VGG_ARCHS: tuple[str, ...] = ("vgg16", "vgg19")
#: Official torchvision weights of each architecture (for the offline instructions in errors).
VGG_URLS: dict[str, str] = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}


def check_vgg_arch(arch: str) -> None:
    """Raise unless ``arch`` is one of :data:`VGG_ARCHS`.

    Args:
        arch: The architecture name.

    Raises:
        ValueError: An unsupported architecture.
    """
    if arch not in VGG_ARCHS:
        raise ValueError(f"arch must be one of {VGG_ARCHS}, got {arch!r}")


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
    check_vgg_arch(arch)
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
        check_vgg_arch(arch)
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
        mean, std = imagenet_mean_std()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @staticmethod
    def _load(arch: str, weights_path: str | Path | None, sha256: str | None) -> nn.Sequential:
        how = offline_instructions(arch, VGG_URLS[arch], save_as=f"{arch}.pth")
        path = local_weights_file(
            weights_path,
            arch,
            how,
            sha256=sha256,
            unset_hint="; for tests only, VGGFeatures.random() gives random weights",
        )
        state = load_state_dict(path)
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
