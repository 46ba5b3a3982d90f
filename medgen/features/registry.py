"""Feature extractors by name, each with a record that makes numbers comparable or not.

:func:`build_extractor` maps a name to an extractor and a JSON-friendly record (name, weights file
name, its SHA-256, the feature width, the input dimensionality); :mod:`medgen.metrics` stores the
record with every result, so two numbers are compared only when their records agree.

========================  ====  =============================================  ======================
name                      dims  net                                            weights file
========================  ====  =============================================  ======================
``pixels``                2, 3  average-pooled pixels                          none
``random_conv``           2, 3  fixed random conv net (seed 0)                 none
``inception_v3``          2     torchvision Inception-v3                       ``inception_v3_google-0cc3c7bd.pth``
``tf_inception``          2     TF-Inception port of pytorch-fid (FID)         ``pt_inception-2015-12-05-6726825d.pth``
``resnet50``              2     torchvision ResNet-50 (ImageNet)               ``resnet50-0676ba61.pth``
``radimagenet_resnet50``  2     RadImageNet ResNet-50 (MAISI's 2.5D FID)       ``RadImageNet-ResNet50_notop.pth``
``dinov2``                2     DINOv2 ViT, class token (FD_DINOv2)            ``dinov2_vitl14_pretrain.pth``
``medicalnet``            3     MedicalNet 3D ResNet-10/18/50                  ``resnet_10.pth`` ...
========================  ====  =============================================  ======================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from medgen.features.dinov2 import DINOv2Features
from medgen.features.extractors import PixelFeatures, RandomConvFeatures, TorchvisionFeatures
from medgen.features.inception import TFInceptionFeatures
from medgen.features.resnets import MedicalNetFeatures, RadImageNetFeatures
from medgen.features.weights import file_sha256

__all__ = ["EXTRACTORS", "WEIGHT_FILES", "build_extractor"]

#: Extractor names and the spatial dimensionalities they accept.
EXTRACTORS: dict[str, tuple[int, ...]] = {
    "pixels": (2, 3),
    "random_conv": (2, 3),
    "inception_v3": (2, 3),
    "tf_inception": (2,),
    "resnet50": (2, 3),
    "radimagenet_resnet50": (2,),
    "dinov2": (2,),
    "medicalnet": (3,),
}

#: The upstream file name of each weighted extractor (documented in docs/evaluation.md).
WEIGHT_FILES: dict[str, str] = {
    "inception_v3": "inception_v3_google-0cc3c7bd.pth",
    "tf_inception": "pt_inception-2015-12-05-6726825d.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "radimagenet_resnet50": "RadImageNet-ResNet50_notop.pth",
    "dinov2": "dinov2_vitl14_pretrain.pth",
    "medicalnet": "resnet_10.pth, resnet_18.pth or resnet_50.pth",
}


def build_extractor(
    name: str | nn.Module,
    spatial_dims: int,
    weights_path: str | Path | None = None,
    sha256: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the extractor ``name`` for ``spatial_dims``-D inputs and describe it.

    Args:
        name: a key of :data:`EXTRACTORS`, or any ``nn.Module`` mapping images to ``(B, F)``.
        spatial_dims: 2 (images, or the slices of a 2.5D protocol) or 3 (volumes).
        weights_path: the local weights file of a weighted extractor.
        sha256: expected SHA-256 of ``weights_path``; checked when given.

    Returns:
        ``(extractor in eval mode, record)``; the record has ``extractor``, ``description``,
        ``weights`` (file name or ``None``) and ``weights_sha256``.

    Raises:
        ValueError: unknown name, or a name that does not take ``spatial_dims``-D input.
        FileNotFoundError: missing weights (the message says where to get them).
    """
    if isinstance(name, nn.Module):
        record = {"extractor": type(name).__name__, "description": repr(name)[:200]}
        return name.eval(), {**record, "weights": None, "weights_sha256": None}
    if name not in EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {sorted(EXTRACTORS)}, got {name!r}")
    if spatial_dims not in EXTRACTORS[name]:
        dims = " or ".join(f"{d}D" for d in EXTRACTORS[name])
        raise ValueError(
            f"feature_extractor={name!r} takes {dims} input, not {spatial_dims}D; "
            + (
                "use protocol=2.5d (slices of the volumes) or a 3D extractor (medicalnet, "
                "random_conv, pixels)"
                if spatial_dims == 3
                else "use a 2D extractor for images"
            )
        )
    if name == "pixels":
        size = 16 if spatial_dims == 2 else 8  # 8^3 = 512 features keep 3D covariances small
        net: nn.Module = PixelFeatures(size)
        description = f"pixels ({size}-per-axis average pool of the channel mean)"
    elif name == "random_conv":
        net = RandomConvFeatures(spatial_dims=spatial_dims, seed=0)
        description = "random_conv (seed 0, width 64)"
    elif name in ("inception_v3", "resnet50"):
        net = TorchvisionFeatures(name, weights_path, sha256=sha256)
        description = f"torchvision {name}"
    elif name == "tf_inception":
        net = TFInceptionFeatures(weights_path, sha256=sha256)
        description = "TF-Inception 2015-12-05 port (pytorch-fid), pool3"
    elif name == "radimagenet_resnet50":
        net = RadImageNetFeatures(weights_path, sha256=sha256)
        description = "RadImageNet ResNet-50, BGR mean subtraction, spatial mean of the last stage"
    elif name == "dinov2":
        net = DINOv2Features(weights_path, sha256=sha256)
        c = net.config
        description = f"DINOv2 ViT (width {c['embed_dim']}, depth {c['depth']}), class token, 224"
    else:
        net = MedicalNetFeatures(weights_path, sha256=sha256)
        description = f"MedicalNet ResNet-{net.depth}, z-scored volume, spatial mean"
    weights = None if name in ("pixels", "random_conv") else Path(str(weights_path))
    return net.eval(), {
        "extractor": name,
        "description": description,
        "weights": None if weights is None else weights.name,
        "weights_sha256": None if weights is None else (sha256 or file_sha256(weights)).lower(),
    }
