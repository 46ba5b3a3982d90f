"""Intensity and geometry presets (medgen.data.presets): formulas, exact inverses on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen.data import read, write
from medgen.data.presets import (
    PRESETS,
    CropOrPad,
    CTWindow,
    HistologyRGB,
    Identity,
    Microscopy16,
    MRPercentile,
    Orient,
    Pipeline,
    Resample,
    ScaleRange,
    get_preset,
)
from medgen.data.presets import _percentile as percentile


@pytest.fixture(scope="module")
def mni() -> MetaTensor:
    """The MNI152 T1 template (2 mm) shipped with nilearn, as a (1, X, Y, Z) MetaTensor."""
    datasets = pytest.importorskip("nilearn.datasets")
    image = datasets.load_mni152_template(resolution=2)
    data = torch.as_tensor(np.asarray(image.get_fdata(), dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(image.affine, dtype=torch.float64))


@pytest.fixture(scope="module")
def ct() -> MetaTensor:
    """pydicom's CT_small.dcm read by medgen (HU, with its affine)."""
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover
        pytest.skip("CT_small.dcm not available")
    return read(path)


@pytest.fixture(scope="module")
def ihc() -> torch.Tensor:
    """scikit-image's immunohistochemistry image as (3, H, W) uint8."""
    data = pytest.importorskip("skimage.data")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data.immunohistochemistry(), -1, 0)))


def _max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / (b.max() - b.min()))


# ----------------------------------------------------------------------------------------------
# formulas


def test_scale_range_formula_and_clip():
    x = torch.tensor([-50.0, 0.0, 25.0, 100.0, 250.0]).reshape(1, 1, 5)
    y = ScaleRange((0, 200), (-1, 1))(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.flatten(), torch.tensor([-1.0, -1.0, -0.75, 0.0, 1.0]))
    unclipped = ScaleRange((0, 200), (0, 10), clip=False)(x)
    torch.testing.assert_close(unclipped.flatten(), torch.tensor([-2.5, 0.0, 1.25, 5.0, 12.5]))
    back = ScaleRange((0, 200), (0, 10), clip=False).inverse(unclipped)
    torch.testing.assert_close(back, x)
    # with clip, inverse clips model outputs back into the window
    out = torch.tensor([-1.5, 0.0, 1.5]).reshape(1, 1, 3)
    torch.testing.assert_close(
        ScaleRange((0, 200)).inverse(out).flatten(), torch.tensor([0.0, 100.0, 200.0])
    )


def test_ct_window_formula():
    hu = torch.tensor([-3000.0, -1000.0, -500.0, 0.0, 40.0, 1000.0, 3000.0]).reshape(1, 1, 7)
    y = CTWindow()(hu)
    expected = torch.tensor([-1.0, -1.0, -0.5, 0.0, 0.04, 1.0, 1.0])
    torch.testing.assert_close(y.flatten(), expected)
    back = CTWindow().inverse(y).flatten()
    # float32 arithmetic: exact to ~1e-7 of the window; clipped values come back at the edges
    torch.testing.assert_close(back, hu.flatten().clamp(-1000, 1000), atol=1e-3, rtol=0)
    soft = CTWindow(-160, 240)(torch.tensor([[[-160.0, 40.0, 240.0]]]))
    torch.testing.assert_close(soft.flatten(), torch.tensor([-1.0, 0.0, 1.0]))


def test_mr_percentile_formula():
    values = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 100)
    preset = MRPercentile(lower=1.0, upper=99.0, clip=False)
    y = preset(values)
    lo, hi = np.percentile(values.numpy(), [1.0, 99.0])
    stats = y.meta["medgen_preset"]
    assert stats["name"] == "MRPercentile"
    assert stats["low"] == pytest.approx(lo) and stats["high"] == pytest.approx(hi)
    expected = (values - lo) / (hi - lo) * 2 - 1
    torch.testing.assert_close(y.as_tensor(), expected)
    assert float(y.min()) < -1 and float(y.max()) > 1  # not clipped
    clipped = MRPercentile(lower=1.0, upper=99.0)(values)  # the default clips
    torch.testing.assert_close(clipped.as_tensor(), expected.clamp(-1, 1))
    back = MRPercentile(lower=1.0, upper=99.0).inverse(clipped)
    torch.testing.assert_close(back.as_tensor(), values.clamp(lo, hi))


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.standard_normal(12345).astype(np.float32))
    for q in (0.0, 0.5, 37.3, 99.5, 100.0):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data.numpy(), q)), abs=1e-6)
    ints = torch.arange(101, dtype=torch.int32)
    assert percentile(ints, 50.0) == 50.0 and percentile(ints, 0.5) == pytest.approx(0.5)


def test_histology_formula():
    x = torch.tensor([0, 51, 127, 255], dtype=torch.uint8).reshape(1, 2, 2).repeat(3, 1, 1)
    y = HistologyRGB()(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0].flatten(), torch.tensor([0, 51, 127, 255]) / 127.5 - 1)


def test_microscopy_formula_and_bit_depths():
    x = torch.tensor([0, 1, 32767, 65535], dtype=torch.int32).reshape(1, 2, 2)
    y = Microscopy16()(x)
    torch.testing.assert_close(y.flatten(), x.flatten().double().mul(2 / 65535).sub(1).float())
    twelve = Microscopy16(bit_depth=12)
    assert float(twelve(torch.full((1, 2, 2), 4095))[0, 0, 0]) == 1.0
    with pytest.raises(ValueError, match=r"12-bit values in \[0, 4095\]"):
        twelve(torch.full((1, 2, 2), 4096))
    with pytest.raises(ValueError):
        Microscopy16(bit_depth=17)


# ----------------------------------------------------------------------------------------------
# inverses on real data


def test_ct_round_trip_on_ct_small(ct):
    assert float(ct.min()) < -800 and float(ct.max()) > 1000  # HU
    preset = CTWindow()
    y = preset(ct)
    assert isinstance(y, MetaTensor) and y.dtype == torch.float32
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    torch.testing.assert_close(y.affine, ct.affine)
    assert y.meta["filename_or_obj"] == ct.meta["filename_or_obj"]
    back = preset.inverse(y)
    assert _max_rel_error(back, ct.clamp(-1000, 1000)) < 1e-4
    wide = CTWindow(-1024, 3071)  # the full 12-bit CT range: no clipping at all
    assert _max_rel_error(wide.inverse(wide(ct)), ct) < 1e-4


def test_mr_round_trip_on_mni(mni):
    preset = MRPercentile(clip=False)
    y = preset(mni)
    assert isinstance(y, MetaTensor) and y.shape == mni.shape
    torch.testing.assert_close(y.affine, mni.affine)
    lo, hi = np.percentile(mni.numpy(), [0.5, 99.5])
    assert y.meta["medgen_preset"]["low"] == pytest.approx(lo, abs=1e-6)
    assert y.meta["medgen_preset"]["high"] == pytest.approx(hi, abs=1e-6)
    back = preset.inverse(y)
    assert "medgen_preset" not in back.meta
    assert _max_rel_error(back, mni) < 1e-4
    # explicit statistics: a model output without meta goes back to the same units
    stats = y.meta["medgen_preset"]
    plain = preset.inverse(y.as_tensor(), stats=stats)
    assert _max_rel_error(plain, mni) < 1e-4
    plain = preset.inverse(y.as_tensor(), stats=(stats["low"], stats["high"]))
    assert _max_rel_error(plain, mni) < 1e-4
    # a preset rebuilt from its config inverts it too
    assert _max_rel_error(get_preset(preset.config()).inverse(y), mni) < 1e-4


def test_mr_default_clips_the_tails_only(mni):
    preset = MRPercentile()
    y = preset(mni)
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    stats = y.meta["medgen_preset"]
    back = preset.inverse(y)
    assert _max_rel_error(back, mni.clamp(stats["low"], stats["high"])) < 1e-4
    inside = (mni >= stats["low"]) & (mni <= stats["high"])
    assert float(inside.float().mean()) > 0.99
    assert _max_rel_error(back[inside], mni[inside]) < 1e-4


def test_mr_channel_wise(mni):
    two = torch.cat([mni.as_tensor(), 1000 * mni.as_tensor() + 50])
    preset = MRPercentile(channel_wise=True, clip=False)
    y = preset(two)
    lows = y.meta["medgen_preset"]["low"]
    assert len(lows) == 2 and lows[1] == pytest.approx(1000 * lows[0] + 50, rel=1e-5)
    torch.testing.assert_close(y[0], y[1], atol=1e-4, rtol=0)
    assert _max_rel_error(preset.inverse(y)[1], two[1]) < 1e-4


def test_mr_inverse_needs_statistics(mni):
    with pytest.raises(ValueError, match="percentiles"):
        MRPercentile().inverse(torch.zeros(1, 4, 4))


def test_mr_constant_image():
    y = MRPercentile()(torch.full((1, 4, 4), 7.0))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(MRPercentile().inverse(y).as_tensor(), torch.full((1, 4, 4), 7.0))


def test_histology_exact_round_trip(ihc):
    preset = HistologyRGB()
    y = preset(ihc)
    assert y.shape == ihc.shape and y.dtype == torch.float32
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    back = preset.inverse(y)
    assert back.dtype == torch.uint8
    assert torch.equal(back, ihc)
    # float 0-255 input works as well
    assert torch.equal(preset.inverse(preset(ihc.float())), ihc)


def test_microscopy_exact_round_trip_every_level():
    levels = torch.arange(65536, dtype=torch.int32).reshape(1, 256, 256)
    preset = Microscopy16()
    back = preset.inverse(preset(levels))
    assert back.dtype == torch.int32 and torch.equal(back, levels)
    volume = levels.reshape(1, 16, 64, 64)  # a 3D stack too
    assert torch.equal(preset.inverse(preset(volume)), volume)


def test_microscopy_round_trip_of_a_16_bit_file(tmp_path):
    data = pytest.importorskip("skimage.data")
    cam = data.camera().astype(np.uint16) * 257
    image = read(write(cam[None], tmp_path / "cam16.png"))
    assert image.dtype == torch.int32
    preset = Microscopy16()
    back = preset.inverse(preset(image))
    assert torch.equal(back.as_tensor(), image.as_tensor())
    assert back.meta["source_dtype"] == "uint16"  # still writes as a 16-bit PNG


# ----------------------------------------------------------------------------------------------
# geometry


def test_orient_is_exactly_invertible(mni):
    preset = Orient("LPS")
    y = preset(mni)
    assert y.shape == mni.shape
    assert y.affine[0, 0] < 0 and y.affine[1, 1] < 0  # x now points left, y posterior
    torch.testing.assert_close(y.as_tensor(), mni.as_tensor().flip(1).flip(2))
    back = preset.inverse(y)
    assert torch.equal(back.as_tensor(), mni.as_tensor())
    torch.testing.assert_close(back.affine, mni.affine)
    assert len(back.applied_operations) == 0
    assert len(mni.applied_operations) == 0  # the input is untouched


def test_orient_2d_dicom(ct):
    y = Orient("RAS")(ct)  # 2D: uses "RA"
    assert y.shape == ct.shape
    back = Orient("RAS").inverse(y)  # another instance of the same preset inverts it
    assert torch.equal(back.as_tensor(), ct.as_tensor())
    torch.testing.assert_close(back.affine, ct.affine)


def test_resample_restores_grid_and_values(mni):
    preset = Resample(1.0)
    y = preset(mni)
    # the first and last voxel centres stay put: n voxels of 2 mm span 2n - 1 voxels of 1 mm
    assert tuple(y.shape[1:]) == tuple(2 * s - 1 for s in mni.shape[1:])
    np.testing.assert_allclose(np.linalg.norm(y.affine[:3, :3].numpy(), axis=0), [1.0, 1.0, 1.0])
    back = preset.inverse(y)
    assert back.shape == mni.shape
    torch.testing.assert_close(back.affine, mni.affine)
    # linear up- then down-sampling blurs a little, no more
    error = (back.as_tensor() - mni.as_tensor()).abs()
    assert float(error.mean()) < 0.01 * float(mni.max())


def test_crop_or_pad(mni, ct):
    pad = CropOrPad((100, 120, 100), value=-1.0)
    y = pad(mni)
    assert y.shape == (1, 100, 120, 100)
    assert float(y[0, 0, 0, 0]) == -1.0
    # voxels keep their world position
    np.testing.assert_allclose(
        (y.affine.numpy() @ [0, 1, 2, 1])[:3], (mni.affine.numpy() @ [0, 0, 0, 1])[:3]
    )
    back = pad.inverse(y)
    assert torch.equal(back.as_tensor(), mni.as_tensor())  # padding only: exact
    torch.testing.assert_close(back.affine, mni.affine)
    crop = CropOrPad((64, 96))
    y = crop(ct)
    assert y.shape == (1, 64, 96)
    back = crop.inverse(y)
    assert back.shape == ct.shape
    torch.testing.assert_close(back.affine, ct.affine)
    inner = (slice(None), slice(32, 96), slice(16, 112))
    assert torch.equal(back.as_tensor()[inner], ct.as_tensor()[inner].float())


def test_pipeline_inverts_in_reverse_order(mni):
    pipe = Pipeline(Orient("LPS"), CropOrPad((96, 112, 96)), Resample(3.0), MRPercentile())
    y = pipe(mni)
    assert len(y.applied_operations) == 3 and "medgen_preset" in y.meta
    back = pipe.inverse(y)
    assert back.shape == mni.shape
    torch.testing.assert_close(back.affine, mni.affine)
    assert float((back.as_tensor() - mni.as_tensor()).abs().mean()) < 0.02
    # inverting out of order is refused rather than silently wrong
    with pytest.raises(ValueError, match="reverse order"):
        Orient("LPS").inverse(MRPercentile().inverse(y))


def test_pipeline_order_with_recording_steps():
    calls = []

    class Step:
        def __init__(self, name):
            self.name = name

        def __call__(self, x):
            calls.append(self.name)
            return x

        def inverse(self, x):
            calls.append(self.name + "^-1")
            return x

    pipe = Pipeline(Step("a"), Step("b"), Step("c"))
    pipe.inverse(pipe(torch.zeros(1, 2, 2)))
    assert calls == ["a", "b", "c", "c^-1", "b^-1", "a^-1"]


def test_geometry_inverse_without_record(mni):
    with pytest.raises(ValueError, match="Spacing"):
        Resample(2.0).inverse(mni)


# ----------------------------------------------------------------------------------------------
# configs, registry, errors


def test_registry_and_configs():
    assert set(PRESETS) == {"ct", "mr", "histology", "microscopy16", "phantom", "none"}
    for name, preset in PRESETS.items():
        built = get_preset(name)
        assert built == preset and built is not preset
        config = built.config()
        assert json.loads(json.dumps(config)) == config  # JSON-friendly
        assert get_preset(config) == built
    assert get_preset("CT") == CTWindow()
    assert get_preset(None) == Identity()
    assert get_preset({"name": "ct", "low": -160, "high": 240}) == CTWindow(-160, 240)
    phantom = get_preset("phantom")
    torch.testing.assert_close(
        phantom(torch.tensor([[[0.0, 0.5, 1.0]]])), torch.tensor([[[-1.0, 0.0, 1.0]]])
    )
    hydra = {"_target_": "medgen.data.presets.CTWindow", "low": -100.0, "high": 300.0}
    assert get_preset(hydra) == CTWindow(-100, 300)
    pipe = get_preset(["ct", {"_target_": "medgen.data.presets.Orient", "axcodes": "LPS"}])
    assert isinstance(pipe, Pipeline) and len(pipe) == 2
    rebuilt = get_preset(pipe.config())
    assert isinstance(rebuilt, Pipeline) and rebuilt.config() == pipe.config()
    assert pipe.output_range == (-1.0, 1.0)
    keep = CTWindow()
    assert get_preset(keep) is keep


def test_hydra_instantiate_and_unsafe_targets():
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"_target_": "medgen.data.presets.MRPercentile"})
    assert get_preset(config) == MRPercentile()
    with pytest.raises(ValueError, match="not allowed"):
        get_preset({"_target_": "os.system", "command": "true"})


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="unknown preset 'pet'") as info:
        get_preset("pet")
    for name in PRESETS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_nan_and_inf_refused(name):
    preset = get_preset(name)
    shape = (3, 4, 4) if name == "histology" else (1, 4, 4)
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(shape)
        x[0, 1, 2] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            preset(x)
    with pytest.raises(ValueError, match="NaN/Inf"):
        preset.inverse(torch.full(shape, float("nan")))


def test_errors_name_the_file_and_the_expectation(ihc):
    x = MetaTensor(torch.full((1, 4, 4), float("nan")), meta={"filename_or_obj": "sub-01.nii.gz"})
    with pytest.raises(ValueError, match=r"^sub-01\.nii\.gz: CTWindow.*NaN"):
        CTWindow()(x)
    with pytest.raises(ValueError, match=r"2D image \(3, H, W\)"):
        HistologyRGB()(torch.zeros(3, 8, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expects 3 channels"):
        HistologyRGB()(ihc[:1])
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        HistologyRGB()(ihc.float() / 255 * 300)
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(C, D, H, W\)"):
        CTWindow()(torch.zeros(8, 8))
    with pytest.raises(ValueError):
        CTWindow(low=10, high=-10)
    with pytest.raises(ValueError):
        MRPercentile(lower=60, upper=40)
    with pytest.raises(ValueError):
        Resample(-1.0)
    with pytest.raises(ValueError):
        CropOrPad((0, 4))


def test_numpy_input_and_input_untouched(ct):
    array = np.linspace(-1000, 1000, 16, dtype=np.float32).reshape(1, 4, 4)
    y = CTWindow()(array)
    assert isinstance(y, torch.Tensor) and not isinstance(y, MetaTensor)
    before = ct.clone()
    CTWindow()(ct)
    MRPercentile()(ct)
    assert torch.equal(ct.as_tensor(), before.as_tensor()) and "medgen_preset" not in ct.meta
