"""Utility of synthetic data: train on synthetic, test on real (TSTR).

Esteban, Hyland, Rätsch ("Real-valued (medical) time series generation with recurrent conditional
GANs", 2017) proposed judging synthetic data by what a downstream model learns from it. Here a
small MONAI network is trained three times, on the real training set, on the synthetic set and on
both, always with the same settings and seed, and each is tested on held-out real data:

- ``task="classification"``: :class:`monai.networks.nets.Classifier`; reports the ROC AUC
  (Mann-Whitney estimate with ties counted one half; one-vs-rest macro average for more than two
  classes);
- ``task="segmentation"``: :class:`monai.networks.nets.UNet` with Dice + cross-entropy loss
  (:class:`monai.losses.DiceCELoss`); reports the mean Dice of the thresholded foreground over the
  test images (an image with empty prediction and empty truth counts 1).

Each score comes with a paired bootstrap confidence interval over the test images
(:func:`~medgen.metrics.bootstrap.bootstrap_ci`). Labelled synthetic data comes from a
conditional generator (class-conditional samples, or image-mask pairs); for folders see
:func:`read_labelled_folder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.metrics.bootstrap import bootstrap_ci

__all__ = ["REGIMES", "TASKS", "dice_per_image", "read_labelled_folder", "roc_auc", "tstr"]

#: Training sets compared by :func:`tstr`.
REGIMES = ("real", "synthetic", "real+synthetic")
#: Downstream tasks.
TASKS = ("classification", "segmentation")

LabelledSet = tuple[Tensor, Tensor]


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``(N,)`` scores for binary ``(N,)`` labels, or ``(N, K)`` scores (macro OvR)."""
    scores, labels = torch.as_tensor(scores).double(), torch.as_tensor(labels).long()
    if scores.ndim == 2 and scores.shape[1] > 1:
        aucs = [roc_auc(scores[:, k], (labels == k).long()) for k in range(scores.shape[1])]
        valid = [a for a in aucs if a == a]
        return sum(valid) / len(valid) if valid else float("nan")
    scores = scores.flatten()
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def dice_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Dice of binary ``(N, 1, *spatial)`` masks per image; 1 when both are empty."""
    p, t = pred.flatten(1).double(), target.flatten(1).double()
    inter = (p * t).sum(1)
    total = p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-12), torch.ones_like(total))


def _check_set(name: str, data: LabelledSet, task: str, shape: tuple[int, ...] | None) -> None:
    images, labels = data
    if images.ndim not in (4, 5) or len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"utility set {name!r}: need (N, C, *spatial) images and N labels, got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if shape is not None and tuple(images.shape[1:]) != shape:
        raise ValueError(
            f"utility set {name!r}: images are {tuple(images.shape[1:])}, the real test images "
            f"{shape}; resample them to one size"
        )
    if task == "segmentation" and tuple(labels.shape[2:]) != tuple(images.shape[2:]):
        raise ValueError(f"utility set {name!r}: masks {tuple(labels.shape)} do not fit images")


def _make_net(task: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    from monai.networks.nets import Classifier, UNet

    dims = len(shape) - 1
    if task == "classification":
        out = 1 if classes == 2 else classes
        return Classifier(shape, out, channels=(8, 16, 32), strides=(2, 2, 2), num_res_units=1)
    return UNet(dims, shape[0], 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def _train(
    net: nn.Module,
    data: LabelledSet,
    task: str,
    classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> nn.Module:
    from monai.losses import DiceCELoss

    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    seg_loss = DiceCELoss(sigmoid=True)
    net.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        x, y = images[index].float(), labels[index]
        out = net(x)
        if task == "segmentation":
            loss = seg_loss(out, y.float())
        elif classes == 2:
            loss = F.binary_cross_entropy_with_logits(out.flatten(), y.float())
        else:
            loss = F.cross_entropy(out, y.long())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return net.eval()


@torch.no_grad()
def _predict(net: nn.Module, images: Tensor, task: str, classes: int) -> Tensor:
    outs = [net(images[i : i + 32].float()) for i in range(0, len(images), 32)]
    out = torch.cat(outs)
    if task == "segmentation":
        return (out > 0).float()
    return out.flatten() if classes == 2 else out.softmax(dim=1)


def tstr(
    real_train: LabelledSet,
    synthetic: LabelledSet,
    real_test: LabelledSet,
    *,
    task: str = "classification",
    regimes: Sequence[str] = REGIMES,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    n_boot: int = 200,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Train on real / synthetic / real + synthetic, test on held-out real (see module docstring).

    Args:
        real_train: ``(images (N, C, *spatial), labels)``: class indices ``(N,)`` or binary masks
            ``(N, 1, *spatial)``.
        synthetic: labelled synthetic data in the same units and size.
        real_test: held-out real data.
        task: ``"classification"`` or ``"segmentation"``.
        regimes: which of :data:`REGIMES` to run.
        steps, batch_size, lr, seed: training settings (the same for every regime).
        n_boot, confidence: bootstrap over test images.

    Returns:
        ``{"task", "metric", "n_test", "settings", "<regime>": {"value", "ci_low", "ci_high",
        "n_train", ...}}``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    unknown = set(regimes) - set(REGIMES)
    if unknown:
        raise ValueError(f"regimes must be among {REGIMES}, got {sorted(unknown)}")
    shape = tuple(real_test[0].shape[1:])
    for name, data in (
        ("real_test", real_test),
        ("real_train", real_train),
        ("synthetic", synthetic),
    ):
        _check_set(name, data, task, shape)
    classes = 2
    if task == "classification":
        classes = int(max(int(d[1].max()) for d in (real_train, synthetic, real_test))) + 1
        classes = max(classes, 2)
    sets = {
        "real": real_train,
        "synthetic": synthetic,
        "real+synthetic": (
            torch.cat([real_train[0], synthetic[0]]),
            torch.cat([real_train[1], synthetic[1]]),
        ),
    }
    test_x, test_y = real_test
    metric = "roc_auc" if task == "classification" else "dice"
    result: dict[str, Any] = {
        "task": task,
        "metric": metric,
        "n_test": len(test_x),
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed},
    }
    for regime in regimes:
        torch.manual_seed(seed)  # the same initial weights for every regime
        net = _make_net(task, shape, classes)
        net = _train(net, sets[regime], task, classes, steps, batch_size, lr, seed)
        pred = _predict(net, test_x, task, classes)
        if task == "classification":
            stat = bootstrap_ci(
                roc_auc,
                (pred, test_y),
                n_boot=n_boot,
                confidence=confidence,
                seed=seed,
                paired=True,
            )
        else:
            per_image = dice_per_image(pred, test_y)
            stat = bootstrap_ci(
                lambda d: float(d.mean()),
                (per_image,),
                n_boot=n_boot,
                confidence=confidence,
                seed=seed,
            )
        result[regime] = {**stat, "n_train": len(sets[regime][0])}
    return result


def read_labelled_folder(folder: str | Path, task: str, transform=None) -> LabelledSet:
    """Read a labelled folder for :func:`tstr`.

    Classification: one sub-folder per class (``folder/<class>/*.png``; classes in sorted name
    order are 0, 1, ...). Segmentation: ``folder/images/`` and ``folder/labels/`` with the same
    file names (masks: foreground where the label is > 0).

    Args:
        folder: the folder.
        task: ``"classification"`` or ``"segmentation"``.
        transform: optional callable applied to every float image (e.g. units to ``[0, 1]``);
            8/16-bit files are scaled to ``[0, 1]`` by their dtype's range instead.

    Raises:
        MedgenIOError: missing or empty folders, unmatched names, images of different sizes.
    """
    from medgen.data.io import MedgenIOError, files_by_stem, list_images, read

    folder = Path(folder)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not folder.is_dir():
        raise MedgenIOError(f"{folder}: utility folder does not exist")

    def load(path: Path) -> Tensor:
        image = read(path)
        source = str(image.meta.get("source_dtype", ""))
        x = image.as_tensor().float()
        if source in ("uint8", "uint16"):  # integer files: to [0, 1] by their dtype's range
            return x / (255.0 if source == "uint8" else 65535.0)
        return transform(x) if transform is not None else x

    images: list[Tensor] = []
    labels: list[Tensor] = []
    if task == "classification":
        classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise MedgenIOError(
                f"{folder}: classification needs one sub-folder per class (at least 2), found "
                f"{[p.name for p in classes]}"
            )
        for k, sub in enumerate(classes):
            for path in list_images(sub):
                images.append(load(path))
                labels.append(torch.tensor(k))
    else:
        img_dir, lab_dir = folder / "images", folder / "labels"
        img = files_by_stem(list_images(img_dir), img_dir)
        lab = files_by_stem(list_images(lab_dir), lab_dir)
        if set(img) != set(lab):
            missing = sorted(set(img) ^ set(lab))[:5]
            raise MedgenIOError(f"{folder}: images/ and labels/ names differ, e.g. {missing}")
        for stem in sorted(img):
            images.append(load(img[stem]))
            labels.append((read(lab[stem]).as_tensor() > 0).float()[:1])
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise MedgenIOError(f"{folder}: images of different sizes {sorted(shapes)[:4]}")
    return torch.stack(images), torch.stack(labels)
