"""The FID-standard TF-Inception port, from a local file: features comparable to published FIDs.

Published FIDs (Heusel et al. 2017 and everything since) use the TensorFlow Inception graph of
2015-12-05. Its PyTorch port, ``pt_inception-2015-12-05-6726825d.pth`` (released with
``pytorch-fid``, Seitzer 2020, Apache-2.0; ``torch-fidelity`` uses the same weights), is a
torchvision Inception-v3 with 1008 classes and four differences in the pooling of the mixed
blocks, which :class:`TFInceptionFeatures` reproduces:

- ``Mixed_5b/c/d`` (A blocks), ``Mixed_6b/c/d/e`` (C blocks) and ``Mixed_7b`` (the first E block):
  the 3x3 average pool of the pool branch does not count the zero padding
  (``count_include_pad=False``);
- ``Mixed_7c`` (the second E block): the pool branch uses a 3x3 *max* pool.

Input: ``(B, C, H, W)`` in ``[0, 1]``; gray is repeated to RGB, images are resized bilinearly
(no antialiasing, as pytorch-fid) to 299x299 and scaled to ``[-1, 1]``; the output is the
2048-wide average pool before the classifier ("pool3"). Numbers are comparable to published
FIDs only for 8-bit natural-image-like inputs treated the same way; the resize differs slightly
from TensorFlow's, as in pytorch-fid.

:class:`~medgen.features.extractors.TorchvisionFeatures` (``inception_v3``) uses torchvision's
own ImageNet weights instead: a different net, whose numbers must not be compared with these.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.features.extractors import FrozenBackbone, rgb_images
from medgen.features.resnets import load_into
from medgen.features.weights import load_state_dict, local_weights_file

__all__ = ["TF_INCEPTION_FILE", "TFInceptionFeatures", "tf_inception_v3"]

#: The file name of the pytorch-fid release; its name holds the start of its SHA-256.
TF_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
TF_INCEPTION_HOW = (
    "medgen never downloads; get pt_inception-2015-12-05-6726825d.pth (pytorch-fid release "
    "github.com/mseitzer/pytorch-fid/releases, FID weights 0.1.0) on a machine with internet, "
    "copy it here and pass its path as weights_path"
)


def _pool(x: Tensor, kind: str) -> Tensor:
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _forward_a(block: nn.Module, x: Tensor) -> list[Tensor]:
    b5 = block.branch5x5_2(block.branch5x5_1(x))
    b3 = block.branch3x3dbl_3(block.branch3x3dbl_2(block.branch3x3dbl_1(x)))
    return [block.branch1x1(x), b5, b3, block.branch_pool(_pool(x, "avg"))]


def _forward_c(block: nn.Module, x: Tensor) -> list[Tensor]:
    b7 = block.branch7x7_3(block.branch7x7_2(block.branch7x7_1(x)))
    d = x
    for i in range(1, 6):
        d = getattr(block, f"branch7x7dbl_{i}")(d)
    return [block.branch1x1(x), b7, d, block.branch_pool(_pool(x, "avg"))]


def _forward_e(block: nn.Module, x: Tensor, pool: str) -> list[Tensor]:
    b3 = block.branch3x3_1(x)
    b3 = torch.cat([block.branch3x3_2a(b3), block.branch3x3_2b(b3)], 1)
    d = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    d = torch.cat([block.branch3x3dbl_3a(d), block.branch3x3dbl_3b(d)], 1)
    return [block.branch1x1(x), b3, d, block.branch_pool(_pool(x, pool))]


def tf_inception_v3() -> nn.Module:
    """A torchvision Inception-v3 (1008 classes, no aux head) with the TF graph's pooling."""
    import torchvision

    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        block = getattr(net, name)
        block._forward = lambda x, b=block: _forward_a(b, x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        block = getattr(net, name)
        block._forward = lambda x, b=block: _forward_c(b, x)
    net.Mixed_7b._forward = lambda x, b=net.Mixed_7b: _forward_e(b, x, "avg")
    net.Mixed_7c._forward = lambda x, b=net.Mixed_7c: _forward_e(b, x, "max")
    return net


class TFInceptionFeatures(FrozenBackbone):
    """Pool3 features of the TF-Inception port (see the module docstring).

    Args:
        weights_path: ``pt_inception-2015-12-05-6726825d.pth``.
        sha256: expected SHA-256 of the file; checked when given.

    Shapes:
        ``(B, C, H, W)`` in ``[0, 1]`` -> ``(B, 2048)``.
    """

    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None, sha256: str | None = None) -> None:
        super().__init__()
        path = local_weights_file(weights_path, "TF-Inception", TF_INCEPTION_HOW, sha256=sha256)
        net = tf_inception_v3()
        load_into(net, load_state_dict(path), path, "TF-Inception (pytorch-fid)")
        net.fc = nn.Identity()
        self.net = net.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, H, W)`` in ``[0, 1]`` to ``(B, 2048)``."""
        x = rgb_images(x, "TFInceptionFeatures")
        if tuple(x.shape[2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)
