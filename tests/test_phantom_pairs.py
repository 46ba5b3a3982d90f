"""Paired phantom variants: defocus, H&E/IHC stains and PairedPhantomDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.data.phantoms import (
    PAIRS,
    STAINS,
    PairedPhantomDataset,
    Tissue,
    defocus,
    head_phantom,
    head_phantom_labels,
    stain_phantom,
)

SHAPES = [(2, 48, (48, 48)), (2, (40, 56), (40, 56)), (3, 24, (24, 24, 24))]


def _high_frequency_energy(image: torch.Tensor, cutoff: float = 0.25) -> float:
    """Energy of the spatial frequencies above ``cutoff`` cycles/pixel (of 0.5)."""
    spatial = image.shape[1:]
    spectrum = torch.fft.fftn(image.double(), dim=tuple(range(1, image.ndim)))
    grids = torch.meshgrid(*[torch.fft.fftfreq(n) for n in spatial], indexing="ij")
    radius = torch.sqrt(sum(g**2 for g in grids))
    return float((spectrum.abs() ** 2)[:, radius > cutoff].sum())


def _dab_od(rgb: torch.Tensor) -> np.ndarray:
    """DAB optical density by colour deconvolution (scikit-image's rgb2hed), (H, W)."""
    color = pytest.importorskip("skimage.color")
    return color.rgb2hed(rgb.permute(1, 2, 0).numpy())[..., 2]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("spatial_dims,size,shape", SHAPES)
def test_shapes_and_ranges(pair, spatial_dims, size, shape):
    ds = PairedPhantomDataset(spatial_dims, size, length=3, pair=pair, noise_std=0.02, lesions=1)
    channels = 3 if pair == "stain" else 1
    assert ds.channels == channels and len(ds) == 3
    item = ds[2]
    assert set(item) == {"a", "b", "index"} and item["index"] == 2
    for key in ("a", "b"):
        assert item[key].shape == (channels, *shape)
        assert item[key].dtype == torch.float32
        assert torch.isfinite(item[key]).all()
        assert item[key].min() >= 0 and item[key].max() <= 1
    assert not torch.equal(item["a"], item["b"])


@pytest.mark.parametrize("pair", PAIRS)
def test_deterministic_per_index(pair):
    ds = PairedPhantomDataset(2, 40, length=4, pair=pair, seed=3, noise_std=0.05)
    again = PairedPhantomDataset(2, 40, length=4, pair=pair, seed=3, noise_std=0.05)
    for i in (0, 3):
        x, y = ds[i], again[i]
        assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])
    assert not torch.equal(ds[0]["a"], ds[1]["a"])
    shifted = PairedPhantomDataset(2, 40, length=2, pair=pair, seed=3, noise_std=0.05, offset=3)
    assert torch.equal(shifted[0]["b"], ds[3]["b"]) and shifted[0]["index"] == 3


def test_global_rng_untouched():
    torch.manual_seed(5)
    np.random.seed(5)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    for pair in PAIRS:
        PairedPhantomDataset(2, 32, length=1, pair=pair, noise_std=0.1)[0]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 24)])
def test_contrast_pairs_share_the_label_map(spatial_dims, size):
    ds = PairedPhantomDataset(spatial_dims, size, pair="contrast", source="t1", target="flair")
    item = ds[4]
    # exactly the single-contrast phantoms of the same subject
    assert torch.equal(item["a"], head_phantom(spatial_dims, size, index=4, contrast="t1"))
    assert torch.equal(item["b"], head_phantom(spatial_dims, size, index=4, contrast="flair"))
    labels = head_phantom_labels(spatial_dims, size, index=4)
    a, b = item["a"][0], item["b"][0]
    background = labels == Tissue.BACKGROUND  # up to partial volume at the skin
    assert (a[background] == 0).float().mean() > 0.8 and (b[background] == 0).float().mean() > 0.8
    assert ((a[background] == 0) == (b[background] == 0)).all()
    wm, csf = labels == Tissue.WHITE_MATTER, labels == Tissue.VENTRICLE
    assert a[wm].mean() > a[csf].mean() and b[wm].mean() > b[csf].mean()
    # the tissue boundaries coincide: both images change where the labels change
    edges = labels[1:] != labels[:-1]
    assert (a[1:] - a[:-1]).abs()[edges].mean() > 5 * (a[1:] - a[:-1]).abs()[~edges].mean()
    assert (b[1:] - b[:-1]).abs()[edges].mean() > 5 * (b[1:] - b[:-1]).abs()[~edges].mean()


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 24)])
def test_defocus_pairs_blur_and_keep_the_mean(spatial_dims, size):
    ds = PairedPhantomDataset(spatial_dims, size, pair="defocus", strength=2.0)
    item = ds[1]
    blurred, sharp = item["a"], item["b"]
    assert torch.equal(sharp, head_phantom(spatial_dims, size, index=1))
    assert _high_frequency_energy(blurred) < 0.2 * _high_frequency_energy(sharp)
    # the kernel sums to 1; only the reflected borders of the small grid move the mean a little
    assert float(blurred.mean()) == pytest.approx(float(sharp.mean()), rel=5e-3)


def test_defocus_function():
    image = head_phantom(2, 64, index=2)
    energies = [_high_frequency_energy(defocus(image, s)) for s in (0.0, 1.0, 2.0, 4.0)]
    assert energies == sorted(energies, reverse=True) and energies[-1] < 0.05 * energies[0]
    assert torch.equal(defocus(image, 0.0), image)
    gauss = defocus(image, 1.5, kind="gaussian")
    assert float(gauss.mean()) == pytest.approx(float(image.mean()), rel=1e-4)
    assert gauss.min() >= 0
    # a point spreads into a disk of the given radius, summing to its value
    point = torch.zeros(1, 21, 21, dtype=torch.float64)
    point[0, 10, 10] = 1.0
    disk = defocus(point, 3.0)[0]
    assert float(disk.sum()) == pytest.approx(1.0)
    assert disk[10, 10] > 0 and disk[10, 13] > 0 and disk[10, 15] == 0 and disk[13, 13] == 0
    torch.testing.assert_close(disk, disk.T)
    # 3D, batches via spatial_dims, integer input
    volume = head_phantom(3, 20, index=1)
    assert defocus(volume, 1.5).shape == volume.shape
    batch = torch.stack([image, image])
    torch.testing.assert_close(defocus(batch, 2.0, spatial_dims=2)[1], defocus(image, 2.0))
    assert defocus(torch.ones(1, 8, 8, dtype=torch.int32), 1.0).dtype == torch.float32


def test_defocus_errors():
    with pytest.raises(ValueError, match="disk, gaussian"):
        defocus(torch.zeros(1, 8, 8), 1.0, kind="motion")
    with pytest.raises(ValueError, match="non-negative"):
        defocus(torch.zeros(1, 8, 8), -1.0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        defocus(torch.zeros(8), 1.0)


def test_stains_are_rgb_and_paired():
    he = stain_phantom(2, 96, index=3, stain="he", lesions=2)
    ihc = stain_phantom(2, 96, index=3, stain="ihc", lesions=2)
    labels = head_phantom_labels(2, 96, index=3, lesions=2)
    for rgb in (he, ihc):
        assert rgb.shape == (3, 96, 96) and rgb.dtype == torch.float32
        assert rgb.min() >= 0 and rgb.max() <= 1
        assert (rgb[:, 0, 0] == 1).all()  # white slide around the section
        assert (rgb[:, labels == Tissue.BACKGROUND] > 0.99).float().mean() > 0.97
    tissue = (labels == Tissue.WHITE_MATTER) | (labels == Tissue.GREY_MATTER)
    r, g, b = he[:, tissue].mean(dim=1)
    assert r > g and b > g  # pink-purple: eosin absorbs green most
    # the same nuclei in both stains: haematoxylin maps correlate
    color = pytest.importorskip("skimage.color")
    h_he = color.rgb2hed(he.permute(1, 2, 0).numpy())[..., 0][tissue.numpy()]
    h_ihc = color.rgb2hed(ihc.permute(1, 2, 0).numpy())[..., 0][tissue.numpy()]
    assert np.corrcoef(h_he, h_ihc)[0, 1] > 0.7
    # H&E carries eosin, IHC does not
    e_he = color.rgb2hed(he.permute(1, 2, 0).numpy())[..., 1][tissue.numpy()].mean()
    e_ihc = color.rgb2hed(ihc.permute(1, 2, 0).numpy())[..., 1][tissue.numpy()].mean()
    assert e_he > 3 * abs(e_ihc)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_ihc_is_browner_in_positive_regions(index):
    ds = PairedPhantomDataset(2, 96, pair="stain", lesions=2)
    item = ds[index]
    labels = head_phantom_labels(2, 96, index=index, lesions=2).numpy()
    dab_ihc, dab_he = _dab_od(item["b"]), _dab_od(item["a"])
    positive = (labels == Tissue.GREY_MATTER) | (labels == Tissue.LESION)
    negative = labels == Tissue.WHITE_MATTER
    assert dab_ihc[positive].mean() > 3 * dab_ihc[negative].mean()
    assert dab_ihc[labels == Tissue.LESION].mean() > dab_ihc[labels == Tissue.GREY_MATTER].mean()
    assert dab_ihc[positive].mean() > 3 * dab_he[positive].mean()


def test_stain_3d_and_noise():
    stack = stain_phantom(3, (12, 32, 32), stain="ihc", noise_std=0.05)
    assert stack.shape == (3, 12, 32, 32) and stack.min() >= 0 and stack.max() <= 1
    assert torch.equal(stack, stain_phantom(3, (12, 32, 32), stain="ihc", noise_std=0.05))


def test_unknown_kinds_name_the_options():
    with pytest.raises(ValueError, match="unknown pair kind 'style'") as info:
        PairedPhantomDataset(pair="style")
    assert all(p in str(info.value) for p in PAIRS)
    with pytest.raises(ValueError, match="unknown stain 'pas'") as info:
        stain_phantom(2, 16, stain="pas")
    assert all(s in str(info.value) for s in STAINS)
    with pytest.raises(ValueError, match="unknown contrast 'ct'"):
        PairedPhantomDataset(pair="contrast", target="ct")
    with pytest.raises(ValueError, match="strength"):
        PairedPhantomDataset(pair="defocus", strength=-1)
    with pytest.raises(ValueError):
        PairedPhantomDataset(noise_std=-0.1)
    with pytest.raises(IndexError):
        PairedPhantomDataset(length=2)[2]
    # stain pairs do not use the contrasts
    assert PairedPhantomDataset(pair="stain", source="anything", length=1).channels == 3


def test_dataloader_batches():
    ds = PairedPhantomDataset(3, 16, length=4, pair="defocus", noise_std=0.01)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["a"].shape == (4, 1, 16, 16, 16) and batch["b"].shape == (4, 1, 16, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_unpaired_items_show_another_subject_in_b():
    paired = PairedPhantomDataset(2, size=24, length=4, pair="defocus", seed=1)
    unpaired = PairedPhantomDataset(2, size=24, length=4, pair="defocus", seed=1, unpaired=True)
    for i in range(4):
        torch.testing.assert_close(unpaired[i]["a"], paired[i]["a"])  # a is unchanged
        # b is the in-focus image of subject (i + 2) % 4, not of subject i
        torch.testing.assert_close(unpaired[i]["b"], paired[(i + 2) % 4]["b"])
        assert not torch.equal(unpaired[i]["b"], paired[i]["b"])
