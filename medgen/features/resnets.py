"""Medical ResNet feature extractors from local weights: RadImageNet ResNet-50 and MedicalNet.

Both nets are written here from their published descriptions so that their *upstream* state dicts
load key for key (nothing is converted, nothing downloads):

- :class:`RadImageNetResNet50` / :class:`RadImageNetFeatures`: the ResNet-50 trained on
  RadImageNet (Mei et al., "RadImageNet: an open radiologic deep learning research dataset for
  effective transfer learning", Radiology: AI 4(5), 2022), in the layout of its PyTorch port
  (``Warvito/radimagenet-models``, the weights MAISI loads through ``torch.hub`` for its 2.5D FID):
  a Keras-style ResNet-50, i.e. every convolution has a bias, the stride of a bottleneck sits in
  its first 1x1 convolution, batch norm uses ``eps=1.001e-5``. The features are the spatial mean
  of the last stage, ``F = 2048``.
- :class:`MedicalNetResNet` / :class:`MedicalNetFeatures`: the 3D ResNet-10/18/50 of MedicalNet
  (Chen, Ma, Zheng, "Med3D: transfer learning for 3D medical image analysis", arXiv 1904.00625,
  2019), in the layout of its released ``resnet_10.pth`` / ``resnet_18.pth`` / ``resnet_50.pth``
  (``module.`` prefix removed on load; the segmentation head ``conv_seg.*`` is ignored): a 7^3
  stride-2 stem and a max pool, four stages of basic (10/18) or bottleneck (50) blocks, the last
  two with stride 1 and dilation 2 and 4, and shortcut "A" (stride + zero channel padding, no
  weights) or "B" (1^3 convolution + batch norm), which is read from the state dict. The features
  are the spatial mean of the last stage: ``F = 512`` (10/18) or ``2048`` (50).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.features.extractors import FrozenBackbone, rgb_images
from medgen.features.weights import load_state_dict, local_weights_file

__all__ = [
    "MEDICALNET_DEPTHS",
    "MedicalNetFeatures",
    "MedicalNetResNet",
    "RadImageNetFeatures",
    "RadImageNetResNet50",
    "load_into",
]

RADIMAGENET_HOW = (
    "medgen never downloads; get RadImageNet-ResNet50_notop.pth (the PyTorch port of the "
    "RadImageNet ResNet-50, github.com/Warvito/radimagenet-models, whose torch.hub entry "
    "'radimagenet_resnet50' MAISI uses) on a machine with internet, copy it here and pass its "
    "path as weights_path"
)
MEDICALNET_HOW = (
    "medgen never downloads; get resnet_10.pth, resnet_18.pth or resnet_50.pth (or the "
    "*_23dataset.pth variants) from the MedicalNet release (github.com/Tencent/MedicalNet, "
    "pretrain models), copy the file here and pass its path as weights_path"
)

#: MedicalNet depths: (block kind, blocks per stage).
MEDICALNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def load_into(net: nn.Module, state: dict[str, Tensor], path: Path, what: str, ignore=()) -> None:
    """Load ``state`` into ``net`` strictly (keys starting with ``ignore`` dropped first).

    Raises:
        ValueError: missing, unexpected or mis-shaped keys; the message names the file.
    """
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a {what} state dict: {exc}") from exc


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 width) residual block, in 2D or 3D.

    ``stride_first`` puts the stride in the first 1x1 convolution (Keras / RadImageNet) instead of
    the 3x3 one (torchvision / MedicalNet).
    """

    expansion = 4

    def __init__(
        self,
        dims: int,
        in_ch: int,
        planes: int,
        stride: int,
        dilation: int,
        bias: bool,
        eps: float,
        stride_first: bool,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        s1, s2 = (stride, 1) if stride_first else (1, stride)
        self.conv1 = conv(in_ch, planes, 1, stride=s1, bias=bias)
        self.bn1 = norm(planes, eps=eps)
        self.conv2 = conv(planes, planes, 3, s2, padding=dilation, dilation=dilation, bias=bias)
        self.bn2 = norm(planes, eps=eps)
        self.conv3 = conv(planes, planes * 4, 1, bias=bias)
        self.bn3 = norm(planes * 4, eps=eps)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class _Basic(nn.Module):
    """Two 3x3x3 convolutions with a residual (MedicalNet's basic block)."""

    expansion = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class _ShortcutA(nn.Module):
    """MedicalNet shortcut "A": subsample by ``stride`` and pad the channels with zeros."""

    def __init__(self, out_ch: int, stride: int) -> None:
        super().__init__()
        self.out_ch, self.stride = out_ch, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.out_ch - x.shape[1]))


class RadImageNetResNet50(nn.Module):
    """The RadImageNet ResNet-50 trunk (Keras layout; see the module docstring).

    Shapes:
        ``(B, 3, H, W)`` -> ``(B, 2048, H / 32, W / 32)``.
    """

    def __init__(self) -> None:
        super().__init__()
        eps = 1.001e-5
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (planes, blocks, stride) in enumerate(
            ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1
        ):
            layers = []
            for b in range(blocks):
                down = None
                if b == 0:
                    down = nn.Sequential(
                        nn.Conv2d(in_ch, planes * 4, 1, stride=stride, bias=True),
                        nn.BatchNorm2d(planes * 4, eps=eps),
                    )
                s = stride if b == 0 else 1
                layers.append(_Bottleneck(2, in_ch, planes, s, 1, True, eps, True, down))
                in_ch = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*layers))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 3, H, W)`` to the last stage's ``(B, 2048, h, w)`` feature map."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MedicalNetResNet(nn.Module):
    """A MedicalNet 3D ResNet trunk (see the module docstring).

    Args:
        depth: 10, 18 or 50.
        shortcut: ``"A"`` (no weights) or ``"B"`` (1^3 convolution + batch norm).

    Shapes:
        ``(B, 1, D, H, W)`` -> ``(B, F, D / 8, H / 8, W / 8)``, ``F`` 512 or 2048.
    """

    def __init__(self, depth: int = 10, shortcut: str = "B") -> None:
        super().__init__()
        if depth not in MEDICALNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(MEDICALNET_DEPTHS)}, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        kind, counts = MEDICALNET_DEPTHS[depth]
        self.depth, self.shortcut = depth, shortcut
        expansion = 4 if kind == "bottleneck" else 1
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_ch = 64
        stages = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))
        for i, ((planes, stride, dilation), blocks) in enumerate(
            zip(stages, counts, strict=True), start=1
        ):
            layers: list[nn.Module] = []
            out_ch = planes * expansion
            for b in range(blocks):
                down = None
                if b == 0 and (stride != 1 or in_ch != out_ch):
                    if shortcut == "A":
                        down = _ShortcutA(out_ch, stride)
                    else:
                        down = nn.Sequential(
                            nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False),
                            nn.BatchNorm3d(out_ch),
                        )
                s = stride if b == 0 else 1
                if kind == "bottleneck":
                    block = _Bottleneck(3, in_ch, planes, s, dilation, False, 1e-5, False, down)
                else:
                    block = _Basic(in_ch, planes, s, dilation, down)
                layers.append(block)
                in_ch = out_ch
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.num_features = in_ch

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 1, D, H, W)`` to the last stage's feature map."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _check(x: Tensor, dims: int, who: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != dims + 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        want = "(B, C, H, W)" if dims == 2 else "(B, C, D, H, W)"
        raise ValueError(f"{who} expects {want} inputs, got {shape}")
    return x if x.is_floating_point() else x.float()


class RadImageNetFeatures(FrozenBackbone):
    """RadImageNet ResNet-50 features of 2D images, as in MAISI's 2.5D FID script.

    Input: ``(B, C, H, W)`` in ``[0, 1]`` (gray is repeated to three channels, other channel
    counts are averaged to gray first). As MAISI's ``compute_fid_2-5d_ct.py`` does, the channels
    are taken in BGR order and the ImageNet channel means (B 0.406, G 0.456, R 0.485) are
    subtracted, with no division by the standard deviation; the image is not resized (the net is
    fully convolutional) and the output is the spatial mean of the last stage.

    Args:
        weights_path: the upstream state dict (``RadImageNet-ResNet50_notop.pth``).
        sha256: expected SHA-256 of the file; checked when given.

    Shapes:
        ``(B, C, H, W)`` -> ``(B, 2048)``.
    """

    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None, sha256: str | None = None) -> None:
        super().__init__()
        path = local_weights_file(
            weights_path, "RadImageNet ResNet-50", RADIMAGENET_HOW, sha256=sha256
        )
        net = RadImageNetResNet50()
        load_into(net, load_state_dict(path), path, "RadImageNet ResNet-50")
        self.net = net.eval().requires_grad_(False)
        self.register_buffer(
            "mean", torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, H, W)`` in ``[0, 1]`` to ``(B, 2048)``."""
        x = rgb_images(x, "RadImageNetFeatures").to(self.mean.dtype)
        x = x.flip(1) - self.mean  # RGB -> BGR, then the BGR means
        return self.net(x).mean(dim=(2, 3))


def medicalnet_shortcut(state: dict[str, Tensor]) -> str:
    """``"B"`` when the state dict has downsample weights, else ``"A"``."""
    return "B" if any(".downsample." in k for k in state) else "A"


def medicalnet_depth(state: dict[str, Tensor]) -> int:
    """The MedicalNet depth (10, 18 or 50) a state dict was saved from."""
    if "layer1.0.conv3.weight" in state:
        return 50
    return 18 if "layer1.1.conv1.weight" in state else 10


class MedicalNetFeatures(FrozenBackbone):
    """MedicalNet 3D ResNet features of volumes (the "3D FID" of Med3D-feature papers).

    Input: ``(B, C, D, H, W)``; channels are averaged to one, each volume is z-scored over its
    voxels (``(v - mean) / (std + 1e-5)``, MedicalNet's intensity normalisation as MAISI's script
    applies it), and the output is the spatial mean of the last stage.

    Args:
        weights_path: a MedicalNet release file (``resnet_10.pth`` ...); depth and shortcut type
            are read from its keys.
        sha256: expected SHA-256 of the file; checked when given.
        depth: expected depth (10, 18, 50); ``None`` accepts what the file holds.

    Shapes:
        ``(B, C, D, H, W)`` -> ``(B, 512)`` (depth 10/18) or ``(B, 2048)`` (depth 50).
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        sha256: str | None = None,
        depth: int | None = None,
    ) -> None:
        super().__init__()
        path = local_weights_file(weights_path, "MedicalNet ResNet", MEDICALNET_HOW, sha256=sha256)
        state = load_state_dict(path)
        found = medicalnet_depth(state)
        if depth is not None and int(depth) != found:
            raise ValueError(f"{path}: holds a MedicalNet ResNet-{found}, expected ResNet-{depth}")
        net = MedicalNetResNet(found, medicalnet_shortcut(state))
        load_into(net, state, path, f"MedicalNet ResNet-{found}", ignore=("conv_seg.",))
        self.net = net.eval().requires_grad_(False)
        self.depth = found
        self.num_features = net.num_features

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, D, H, W)`` to ``(B, F)``."""
        x = _check(x, 3, "MedicalNetFeatures").to(self.net.conv1.weight.dtype)
        x = x.mean(dim=1, keepdim=True)
        flat = x.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1, 1)
        std = flat.std(1).view(-1, 1, 1, 1, 1)
        return self.net((x - mean) / (std + 1e-5)).mean(dim=(2, 3, 4))
