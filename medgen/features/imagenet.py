"""The ImageNet normalisation that torchvision's pretrained classifiers expect."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_mean_std"]

#: Per-channel (R, G, B) mean of ImageNet images in ``[0, 1]``, as torchvision normalises them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel (R, G, B) standard deviation of ImageNet images in ``[0, 1]``.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def imagenet_mean_std() -> tuple[Tensor, Tensor]:
    """:data:`IMAGENET_MEAN` and :data:`IMAGENET_STD` as ``(1, 3, 1, 1)`` tensors.

    In the default float dtype, shaped to broadcast over ``(B, 3, H, W)`` images:
    ``(x - mean) / std``.

    Returns:
        ``(mean, std)``.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return mean, std
