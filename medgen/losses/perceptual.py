"""Perceptual (feature) losses with VGG features from local weights; Gram matrices for style.

- :class:`VGGFeatures` (defined in :mod:`medgen.features.vgg`, re-exported here): intermediate
  feature maps of torchvision's VGG-16 / VGG-19 ``features`` stack, loaded from a torchvision
  state dict on local disk (checked by SHA-256 when given). Nothing downloads;
  :meth:`VGGFeatures.random` gives random weights for tests.
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

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from medgen.features.vgg import (
    DEFAULT_LAYERS,
    VGG_URLS,
    LayerSpec,
    VGGFeatures,
    check_vgg_arch,
    resolve_layer,
)

__all__ = ["DEFAULT_LAYERS", "PerceptualLoss", "VGGFeatures", "gram_matrix", "resolve_layer"]


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
            check_vgg_arch(arch)
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
                f"a local torchvision {arch} state dict ({VGG_URLS[arch]} saved on a "
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
