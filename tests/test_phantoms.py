"""Tests of the procedural head phantoms (medgen.data.phantoms)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medgen.data.phantoms as phantoms
from medgen.data.phantoms import (
    CONTRASTS,
    PhantomDataset,
    Tissue,
    head_phantom,
    head_phantom_labels,
)

SHAPES = [
    (2, 64, (64, 64)),
    (2, (48, 64), (48, 64)),
    (2, (64, 40), (64, 40)),
    (3, 32, (32, 32, 32)),
    (3, (24, 32, 20), (24, 32, 20)),
]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _tissue_means(image: torch.Tensor, labels: torch.Tensor) -> dict[Tissue, float]:
    return {t: float(image[0][labels == t].mean()) for t in Tissue if (labels == t).any()}


@pytest.mark.parametrize("spatial_dims,size,shape", SHAPES)
def test_shapes_dtypes_and_range(spatial_dims, size, shape):
    image = head_phantom(spatial_dims, size, index=1, noise_std=0.05, bias_field=0.3)
    assert image.shape == (1, *shape)
    assert image.dtype == torch.float32
    assert torch.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.max() > 0.5  # not blank

    labels = head_phantom_labels(spatial_dims, size, index=1)
    assert labels.shape == shape
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() <= max(Tissue)
    # a head in the middle of the field of view, background in the corners
    assert labels[(0,) * spatial_dims] == Tissue.BACKGROUND
    assert labels[tuple(s // 2 for s in shape)] != Tissue.BACKGROUND


@pytest.mark.parametrize("contrast", sorted(CONTRASTS))
def test_every_contrast_in_range(contrast):
    for spatial_dims, size in ((2, 32), (3, 16)):
        image = head_phantom(spatial_dims, size, contrast=contrast, noise_std=0.1, bias_field=0.5)
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_dtype_argument():
    image = head_phantom(2, 32, dtype=torch.float64)
    assert image.dtype == torch.float64
    assert torch.equal(image.float(), head_phantom(2, 32))


def test_deterministic_within_process():
    for kwargs in ({}, {"contrast": "flair", "noise_std": 0.05, "bias_field": 0.2}):
        a = head_phantom(2, 48, index=7, seed=3, lesions=2, **kwargs)
        b = head_phantom(2, 48, index=7, seed=3, lesions=2, **kwargs)
        assert torch.equal(a, b)
    a = head_phantom(3, 24, index=2, noise_std=0.02)
    assert torch.equal(a, head_phantom(3, 24, index=2, noise_std=0.02))
    assert torch.equal(head_phantom_labels(3, 24, index=2), head_phantom_labels(3, 24, index=2))


def test_deterministic_across_processes():
    # The module is loaded from its file, so the fresh interpreter need not import all of medgen.
    code = (
        "import hashlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('phantoms', {phantoms.__file__!r})\n"
        "m = sys.modules['phantoms'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "h = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()\n"
        "print(h(m.head_phantom(2, 40, index=5, seed=1, contrast='t2', noise_std=0.05,"
        " bias_field=0.2)))\n"
        "print(h(m.head_phantom_labels(3, 20, index=5, seed=1, lesions=2)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    expected = [
        _digest(
            head_phantom(2, 40, index=5, seed=1, contrast="t2", noise_std=0.05, bias_field=0.2)
        ),
        _digest(head_phantom_labels(3, 20, index=5, seed=1, lesions=2)),
    ]
    assert out == expected


def test_indices_and_seeds_give_different_subjects():
    labels = [head_phantom_labels(2, 64, index=i) for i in range(4)]
    labels.append(head_phantom_labels(2, 64, index=0, seed=1))
    for i in range(len(labels)):
        for j in range(i):
            assert not torch.equal(labels[i], labels[j])
    images = [head_phantom(3, 24, index=i) for i in range(3)]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_global_rng_untouched():
    torch.manual_seed(1234)
    np.random.seed(1234)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = head_phantom(2, 32, index=3, noise_std=0.1, bias_field=0.2)
    head_phantom_labels(3, 16, index=3)
    PhantomDataset(size=16, length=2, noise_std=0.1)[1]
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    # and the global state does not influence the result
    torch.manual_seed(99)
    np.random.seed(99)
    assert torch.equal(a, head_phantom(2, 32, index=3, noise_std=0.1, bias_field=0.2))


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 32)])
def test_every_tissue_present(spatial_dims, size):
    for index in range(3):
        labels = head_phantom_labels(spatial_dims, size, index=index, lesions=2)
        assert set(labels.unique().tolist()) == {int(t) for t in Tissue}, index


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (2, (48, 64)), (3, 32)])
def test_exact_lesion_count(spatial_dims, size):
    ndimage = pytest.importorskip("scipy.ndimage")
    for index in range(4):
        for count in (0, 1, 2, 5):
            labels = head_phantom_labels(spatial_dims, size, index=index, lesions=count)
            _, found = ndimage.label((labels == Tissue.LESION).numpy())
            assert found == count, (index, count)


def test_lesion_range():
    ndimage = pytest.importorskip("scipy.ndimage")
    counts = set()
    for index in range(12):
        labels = head_phantom_labels(2, 64, index=index, lesions=(1, 3))
        counts.add(ndimage.label((labels == Tissue.LESION).numpy())[1])
    assert counts <= {1, 2, 3} and len(counts) > 1
    assert not (head_phantom_labels(2, 64, lesions=(0, 0)) == Tissue.LESION).any()


def test_lesions_do_not_change_anatomy():
    a = head_phantom_labels(2, 64, index=4, lesions=0)
    b = head_phantom_labels(2, 64, index=4, lesions=3)
    assert torch.equal(a[b != Tissue.LESION], b[b != Tissue.LESION])
    assert set(a[b == Tissue.LESION].unique().tolist()) == {Tissue.WHITE_MATTER}


def test_contrast_ordering():
    labels = head_phantom_labels(2, 64, index=0, lesions=2)
    for smooth in (False, True):
        m = {
            c: _tissue_means(head_phantom(2, 64, contrast=c, lesions=2, smooth=smooth), labels)
            for c in CONTRASTS
        }
        wm, gm, csf, les = Tissue.WHITE_MATTER, Tissue.GREY_MATTER, Tissue.CSF, Tissue.LESION
        assert m["t1"][wm] > m["t1"][gm] > m["t1"][csf]
        assert m["t1"][Tissue.VENTRICLE] < m["t1"][gm]
        assert m["t2"][csf] > m["t2"][gm] > m["t2"][wm]
        assert m["t2"][Tissue.VENTRICLE] > m["t2"][gm]
        assert m["flair"][les] > m["flair"][wm] > m["flair"][csf]
        assert m["flair"][les] > m["flair"][gm] > m["flair"][csf]
        assert m["flair"][Tissue.VENTRICLE] < m["flair"][wm]
        assert m["pd"][csf] > m["pd"][gm] > m["pd"][wm]
        for c in CONTRASTS:
            assert m[c][Tissue.BACKGROUND] < 0.05


def test_contrasts_share_the_label_map():
    """Without partial volume, every contrast is piecewise constant (up to a faint texture and
    the scalp/skull bands) on one label map."""
    for spatial_dims, size in ((2, 64), (3, 24)):
        labels = head_phantom_labels(spatial_dims, size, index=6, lesions=2)
        for contrast, table in CONTRASTS.items():
            image = head_phantom(
                spatial_dims, size, index=6, contrast=contrast, lesions=2, smooth=False
            )[0]
            for tissue in (
                Tissue.CSF,
                Tissue.GREY_MATTER,
                Tissue.WHITE_MATTER,
                Tissue.VENTRICLE,
                Tissue.LESION,
            ):
                values = image[labels == tissue]
                assert values.numel() > 0
                assert (values - table[tissue]).abs().max() < 0.25 * table[tissue] + 1e-6
            assert (image[labels == Tissue.BACKGROUND] == 0).all()
            assert (image[labels != Tissue.BACKGROUND] > 0).all()


def test_partial_volume_edges():
    """Smooth phantoms are anti-aliased: they match a box-filtered high-resolution phantom much
    better than hard-edged ones do."""
    fine = head_phantom(2, 256, index=2, lesions=1)
    pooled = F.avg_pool2d(fine, 4)
    smooth = head_phantom(2, 64, index=2, lesions=1)
    hard = head_phantom(2, 64, index=2, lesions=1, smooth=False)
    err_smooth = (smooth - pooled).abs().mean()
    err_hard = (hard - pooled).abs().mean()
    assert err_smooth < 0.7 * err_hard
    assert err_smooth < 0.02


def test_noise_and_bias():
    clean = head_phantom(2, 48, index=1)
    noisy = head_phantom(2, 48, index=1, noise_std=0.05)
    biased = head_phantom(2, 48, index=1, bias_field=0.3)
    assert not torch.equal(clean, noisy) and not torch.equal(clean, biased)
    background = head_phantom_labels(2, 48, index=1) == Tissue.BACKGROUND
    assert noisy[0][background].mean() > 0.02  # Rician floor
    assert (noisy - clean).std() == pytest.approx(0.05, rel=0.3)
    assert (biased[clean == 0] == 0).all()  # multiplicative
    # noise is drawn per contrast, the anatomy is not
    t1 = head_phantom(2, 48, index=1, noise_std=0.05)
    t2 = head_phantom(2, 48, index=1, noise_std=0.05, contrast="t2")
    assert not torch.equal(t1 - clean, t2 - head_phantom(2, 48, index=1, contrast="t2"))


def test_unknown_contrast():
    with pytest.raises(ValueError, match="unknown contrast 'ct'") as info:
        head_phantom(2, 32, contrast="ct")
    for name in CONTRASTS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="flair"):
        PhantomDataset(contrast="T1w")
    with pytest.raises(ValueError):
        PhantomDataset(lesions=(2, 1))
    with pytest.raises(ValueError):
        PhantomDataset(noise_std=-1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 4, "size": 8},
        {"spatial_dims": 2, "size": (8, 8, 8)},
        {"spatial_dims": 3, "size": (8, 0, 8)},
        {"spatial_dims": 2, "size": 8, "index": -1},
        {"spatial_dims": 2, "size": 8, "seed": -2},
        {"spatial_dims": 2, "size": 8, "lesions": -1},
        {"spatial_dims": 2, "size": 8, "lesions": (3, 1)},
        {"spatial_dims": 2, "size": 8, "noise_std": -0.1},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        head_phantom(**kwargs)


def test_tiny_grids_work():
    for spatial_dims, size in ((2, 1), (2, 8), (3, 4), (3, (8, 12, 6))):
        image = head_phantom(spatial_dims, size, lesions=3)
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_dataset():
    train = PhantomDataset(spatial_dims=2, size=(32, 24), length=5, seed=2, contrast="t2")
    val = PhantomDataset(spatial_dims=2, size=(32, 24), length=3, seed=2, contrast="t2", offset=5)
    assert len(train) == 5 and len(val) == 3
    item = train[1]
    assert set(item) == {"image", "index"}
    assert item["image"].shape == (1, 32, 24) and item["image"].dtype == torch.float32
    assert item["index"] == 1
    assert torch.equal(item["image"], head_phantom(2, (32, 24), index=1, seed=2, contrast="t2"))
    assert val[0]["index"] == 5
    train_ids = {train[i]["index"] for i in range(len(train))}
    val_ids = {val[i]["index"] for i in range(len(val))}
    assert not train_ids & val_ids
    train_images = [train[i]["image"] for i in range(len(train))]
    assert not any(torch.equal(val[0]["image"], t) for t in train_images)
    for bad in (5, 100, -1):
        with pytest.raises(IndexError):
            train[bad]
    assert list(PhantomDataset(length=0)) == []


def test_dataset_3d_and_dataloader():
    ds = PhantomDataset(spatial_dims=3, size=16, length=4, lesions=1, noise_std=0.02)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    paired = PhantomDataset(spatial_dims=3, size=16, length=4, lesions=1, contrast="flair")
    assert not torch.equal(ds[2]["image"], paired[2]["image"])
