"""Tests for medgen.losses.perceptual: VGG features from local files, perceptual loss, Gram."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
import torchvision
from torch import nn

from medgen.losses import PerceptualLoss, VGGFeatures, gram_matrix
from medgen.losses.perceptual import DEFAULT_LAYERS, resolve_layer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vgg16_model() -> nn.Module:
    """A full torchvision VGG-16 (features and classifier) with arbitrary, seeded weights."""
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None, init_weights=False).eval()


@pytest.fixture(scope="module")
def vgg16_file(vgg16_model, tmp_path_factory):
    """The full VGG-16 state dict saved with torch.save, as torchvision's own files are."""
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(vgg16_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vgg16_features_file(vgg16_model, tmp_path_factory):
    """Only the ``features.*`` part of the VGG-16 state dict (smaller, quicker to read)."""
    path = tmp_path_factory.mktemp("weights") / "vgg16_features.pth"
    state = {f"features.{k}": v for k, v in vgg16_model.features.state_dict().items()}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vgg19_features_state() -> dict[str, torch.Tensor]:
    """A VGG-19 ``features.*`` state dict (random weights)."""
    extractor = VGGFeatures.random("vgg19", layers=("pool5",), seed=1)
    return {f"features.{k}": v.clone() for k, v in extractor.features.state_dict().items()}


@pytest.fixture(scope="module")
def random_vgg() -> VGGFeatures:
    return VGGFeatures.random("vgg19", layers=DEFAULT_LAYERS, seed=0)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- loading local weights


def test_missing_file_names_it_and_says_how_to_get_it(tmp_path):
    path = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(FileNotFoundError) as info:
        VGGFeatures("vgg19", path)
    message = str(info.value)
    assert str(path) in message
    assert "never downloads" in message and "vgg19-dcbb9e9d.pth" in message
    assert "weights='IMAGENET1K_V1'" in message
    with pytest.raises(FileNotFoundError, match="no weights_path"):
        VGGFeatures("vgg19", None)


def test_wrong_sha256_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)  # checked before loading
    wrong = "0" * 64
    with pytest.raises(ValueError) as info:
        VGGFeatures("vgg16", path, sha256=wrong, layers=("relu1_1",))
    message = str(info.value)
    assert str(path) in message and "SHA-256 mismatch" in message
    assert wrong in message and _sha(path) in message


def test_vgg16_file_loaded_as_vgg19_is_refused_naming_file_and_key(vgg16_features_file):
    # even for shallow layers, whose shapes agree between VGG-16 and VGG-19
    for layers in (("relu1_2",), ("relu4_3",)):
        with pytest.raises(ValueError) as info:
            VGGFeatures("vgg19", vgg16_features_file, layers=layers)
        message = str(info.value)
        assert str(vgg16_features_file) in message
        assert "features.16.weight" in message and "vgg16" in message


def test_corrupt_tensor_shape_is_refused_naming_key_and_shapes(vgg19_features_state, tmp_path):
    state = dict(vgg19_features_state)
    state["features.10.weight"] = torch.zeros(256, 64, 3, 3)  # conv3_1 expects 128 inputs
    path = tmp_path / "corrupt.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        VGGFeatures("vgg19", path, layers=("relu1_1",))
    message = str(info.value)
    assert str(path) in message and "features.10.weight" in message
    assert "(256, 64, 3, 3)" in message and "(256, 128, 3, 3)" in message


def test_not_a_vgg_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a torchvision VGG state dict") as info:
        VGGFeatures("vgg19", path)
    assert str(path) in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as info:
        VGGFeatures("vgg19", garbage)
    assert str(garbage) in str(info.value)


def test_valid_file_matches_torchvision_features_exactly(vgg16_model, vgg16_file):
    layers = ("conv1_1", "relu2_2", "block3_conv3", "relu3_3", 5)
    extractor = VGGFeatures("vgg16", vgg16_file, layers=layers)  # full file, classifier ignored
    assert len(extractor.features) == resolve_layer("vgg16", "relu3_3") + 1  # truncated
    x = torch.rand(2, 3, 32, 32)
    feats = extractor(x)
    assert list(feats) == list(layers)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = (x - mean) / std
    expected = {}
    with torch.no_grad():
        for index, module in enumerate(vgg16_model.features[:16]):
            h = module(h)
            expected[index] = h.clone()
    for layer in layers:
        torch.testing.assert_close(
            feats[layer], expected[resolve_layer("vgg16", layer)], rtol=0, atol=0
        )
    # conv output is not overwritten by the (in-place in torchvision) ReLU that follows it
    assert (feats["conv1_1"] < 0).any() and (feats["relu3_3"] >= 0).all()


def test_features_only_safetensors_file_loads(vgg19_features_state, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vgg19_features.safetensors"
    save_file({k: v.contiguous() for k, v in vgg19_features_state.items()}, str(path))
    extractor = VGGFeatures("vgg19", path, sha256=_sha(path).upper(), layers=("relu2_1",))
    reference = VGGFeatures.random("vgg19", layers=("relu2_1",), seed=1)
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(extractor(x)["relu2_1"], reference(x)["relu2_1"], rtol=0, atol=0)
    assert not extractor.is_random


# ---- layer names


def test_layer_names_follow_torchvision_layout():
    from torchvision.models.vgg import cfgs, make_layers

    for arch, letter in (("vgg16", "D"), ("vgg19", "E")):
        layout = make_layers(cfgs[letter])
        convs = [i for i, m in enumerate(layout) if isinstance(m, nn.Conv2d)]
        pools = [i for i, m in enumerate(layout) if isinstance(m, nn.MaxPool2d)]
        assert resolve_layer(arch, "conv1_1") == convs[0] == 0
        assert resolve_layer(arch, "pool5") == pools[-1] == len(layout) - 1
        for block, pool in enumerate(pools, start=1):
            assert resolve_layer(arch, f"pool{block}") == pool
            assert resolve_layer(arch, f"block{block}_pool") == pool
        for index in convs:
            assert isinstance(layout[index + 1], nn.ReLU)
        # relu3_3 of VGG-16 is torchvision features[15]; VGG-19 has conv3_4 and differs afterwards
    assert resolve_layer("vgg16", "relu3_3") == 15
    assert resolve_layer("vgg19", "relu3_3") == 15
    assert resolve_layer("vgg16", "relu4_3") == 22
    assert resolve_layer("vgg19", "relu4_3") == 24
    assert resolve_layer("vgg19", "relu5_1") == 29
    assert resolve_layer("vgg19", "block3_conv3") == resolve_layer("vgg19", "conv3_3") == 14
    assert resolve_layer("vgg19", 10) == resolve_layer("vgg19", "10") == 10
    assert (resolve_layer("vgg19", 0), resolve_layer("vgg19", 5)) == (0, 5)


@pytest.mark.parametrize("bad", ["relu3_4x", "conv6_1", "relu4_4", 31, -1, True])
def test_unknown_layer_lists_valid_names(bad):
    with pytest.raises(ValueError, match="valid names") as info:
        resolve_layer("vgg16", bad)
    assert "relu3_3" in str(info.value) and "blockX_convY" in str(info.value)
    with pytest.raises(ValueError, match="arch must be one of"):
        resolve_layer("vgg11_bn", "relu1_1")


# ---- VGGFeatures behaviour


def test_random_extractor_is_seeded_frozen_and_keeps_global_rng(caplog):
    state = torch.random.get_rng_state()
    with caplog.at_level("WARNING"):
        a = VGGFeatures.random("vgg16", layers=("relu2_2",), seed=3)
    assert "RANDOM" in caplog.text
    assert torch.equal(torch.random.get_rng_state(), state)
    b = VGGFeatures.random("vgg16", layers=("relu2_2",), seed=3)
    c = VGGFeatures.random("vgg16", layers=("relu2_2",), seed=4)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert a.is_random and all(not p.requires_grad for p in a.parameters())
    a.train()
    assert a.training and not a.features.training
    assert not any(m.training for m in a.features.modules())


def test_input_mapping_channels_and_value_range(random_vgg):
    x = torch.rand(2, 1, 32, 32)
    gray = random_vgg(x)
    rgb = random_vgg(x.expand(-1, 3, -1, -1))
    two = random_vgg(torch.cat([x, x], dim=1))  # averaged to gray
    shifted = VGGFeatures.random("vgg19", layers=DEFAULT_LAYERS, seed=0, value_range=(-1.0, 1.0))
    other = shifted(x * 2 - 1)
    for layer in DEFAULT_LAYERS:
        torch.testing.assert_close(gray[layer], rgb[layer])
        torch.testing.assert_close(gray[layer], two[layer])
        torch.testing.assert_close(gray[layer], other[layer], rtol=1e-4, atol=1e-5)
    assert gray["relu4_3"].shape == (2, 512, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_vgg(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="value_range"):
        VGGFeatures.random(value_range=(1.0, 1.0))


def test_layers_override_and_depth_check(random_vgg):
    x = torch.rand(1, 1, 16, 16)
    out = random_vgg(x, layers=(0, "relu2_1"))
    assert list(out) == [0, "relu2_1"] and out[0].shape == (1, 64, 16, 16)
    with pytest.raises(ValueError, match="deeper than this extractor"):
        random_vgg(x, layers=("relu5_1",))


def test_gradient_reaches_the_input_not_the_weights(random_vgg):
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    random_vgg(x)["relu3_3"].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in random_vgg.parameters())


# ---- Gram matrix


def test_gram_matrix_matches_hand_computation():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 4, 5)
    gram = gram_matrix(feats)
    expected = torch.zeros(2, 3, 3)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                expected[b, i, j] = (feats[b, i] * feats[b, j]).sum() / (3 * 4 * 5)
    torch.testing.assert_close(gram, expected)
    volume = torch.randn(1, 2, 3, 4, 5)
    flat = volume.reshape(1, 2, -1)
    torch.testing.assert_close(gram_matrix(volume), flat @ flat.transpose(1, 2) / (2 * 60))
    with pytest.raises(ValueError, match="features"):
        gram_matrix(torch.randn(3, 4))


# ---- PerceptualLoss


def test_disabled_loss_warns_once_and_returns_a_differentiable_zero():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = PerceptualLoss(spatial_dims=2)
        pred = torch.rand(2, 1, 16, 16, requires_grad=True)
        value = loss_fn(pred, torch.rand(2, 1, 16, 16))
        loss_fn(pred, pred.detach())
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "disabled" in message and "weights_path" in message
    assert not loss_fn.enabled and value.item() == 0.0 and value.ndim == 0
    value.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_loss_zero_for_identical_and_positive_otherwise(random_vgg):
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    for distance in ("l1", "l2"):
        for normalize in (True, False):
            loss_fn = PerceptualLoss(extractor=random_vgg, distance=distance, normalize=normalize)
            assert loss_fn.enabled
            assert loss_fn(target, target.clone()).item() == 0.0
            value = loss_fn(pred, target)
            assert value.ndim == 0 and value.item() > 0
    # closer images score lower
    loss_fn = PerceptualLoss(extractor=random_vgg)
    assert loss_fn(target + 0.01 * torch.randn_like(target), target) < loss_fn(pred, target)


def test_layer_weights_and_subset(random_vgg):
    pred, target = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    one = PerceptualLoss(extractor=random_vgg, layers=("relu2_2",))(pred, target)
    two = PerceptualLoss(
        extractor=random_vgg, layers=("relu2_2", "relu3_3"), layer_weights=(2.0, 0.0)
    )(pred, target)
    torch.testing.assert_close(two, 2 * one)
    with pytest.raises(ValueError, match="layer_weights"):
        PerceptualLoss(extractor=random_vgg, layer_weights=(1.0,))
    with pytest.raises(ValueError, match="value_range"):
        PerceptualLoss(extractor=random_vgg, value_range=(-1, 1))


def test_gradient_flows_to_pred(random_vgg):
    pred = torch.rand(2, 1, 32, 32, requires_grad=True)
    target = torch.rand(2, 1, 32, 32)
    PerceptualLoss(extractor=random_vgg)(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    # also when the target requires grad (both go through one batch)
    target.requires_grad_(True)
    pred.grad = None
    PerceptualLoss(extractor=random_vgg, distance="l2")(pred, target).backward()
    assert pred.grad.abs().sum() > 0 and target.grad.abs().sum() > 0


def test_weights_path_builds_an_enabled_loss(vgg16_features_file):
    path = vgg16_features_file
    loss_fn = PerceptualLoss(
        arch="vgg16", weights_path=path, sha256=_sha(path), layers=("relu1_2",)
    )
    assert loss_fn.enabled and not loss_fn.extractor.is_random
    x = torch.rand(1, 1, 16, 16)
    assert loss_fn(x, x).item() == 0.0


def test_extractor_weights_stay_out_of_checkpoints(random_vgg):
    loss_fn = PerceptualLoss(extractor=random_vgg)
    wrapper = nn.Module()
    wrapper.loss = loss_fn
    wrapper.head = nn.Linear(2, 2)
    state = wrapper.state_dict()
    assert sorted(state) == ["head.bias", "head.weight"]
    before = random_vgg.features[0].weight.clone()
    wrapper.load_state_dict(state)  # strict, no missing keys
    assert torch.equal(random_vgg.features[0].weight, before)
    # an old checkpoint with extractor keys loads into a disabled loss too
    with pytest.warns(UserWarning, match="disabled"):
        disabled = PerceptualLoss()
    disabled.load_state_dict({"extractor.features.0.weight": torch.zeros(1)})


def test_2_5d_loss_on_volumes(random_vgg):
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    loss_fn = PerceptualLoss(spatial_dims=3, extractor=random_vgg, num_slices=2)
    assert loss_fn.mode == "2.5d"
    assert loss_fn(target, target.clone()).item() == 0.0  # same slices for pred and target
    value = loss_fn(pred, target)
    assert value.ndim == 0 and value.item() > 0
    # fresh slice draws from the global RNG on every call
    torch.manual_seed(1)
    a = loss_fn(pred, target)
    b = loss_fn(pred, target)
    torch.manual_seed(1)
    assert torch.equal(loss_fn(pred, target), a) and not torch.equal(a, b)
    # three axes differ from axial slices only (same RNG state)
    axial = PerceptualLoss(spatial_dims=3, extractor=random_vgg, num_slices=2, axes=(0,))
    torch.manual_seed(2)
    three = loss_fn(pred, target)
    torch.manual_seed(2)
    assert not torch.allclose(three, axial(pred, target))
    # gradient flows through the slices
    pred.requires_grad_(True)
    loss_fn(pred, target).backward()
    assert pred.grad.abs().sum() > 0
    # anisotropic volume: slices of every axis are valid 2D images
    assert loss_fn(torch.rand(1, 2, 8, 16, 12), torch.rand(1, 2, 8, 16, 12)).item() > 0


def test_slices_are_taken_at_the_same_positions():
    # target differs from pred only in slice 3 along D; with one axial slice per call, the loss
    # is non-zero exactly when slice 3 was drawn
    extractor = VGGFeatures.random("vgg16", layers=("relu1_2",))
    loss_fn = PerceptualLoss(spatial_dims=3, extractor=extractor, num_slices=1, axes=(0,))
    pred = torch.rand(1, 1, 4, 8, 8)
    target = pred.clone()
    target[:, :, 3] = torch.rand(8, 8)
    values = []
    for seed in range(12):
        torch.manual_seed(seed)
        drawn = torch.randperm(4)[0].item()
        torch.manual_seed(seed)
        values.append((drawn, loss_fn(pred, target).item()))
    assert all((v > 0) == (d == 3) for d, v in values)
    assert {d for d, _ in values} >= {3} and len({d for d, _ in values}) > 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        PerceptualLoss(spatial_dims=1)
    with pytest.raises(ValueError, match="mode"):
        PerceptualLoss(spatial_dims=3, mode="2d")
    with pytest.raises(ValueError, match="distance"):
        PerceptualLoss(distance="cos")
    with pytest.raises(ValueError, match="valid names"):
        PerceptualLoss(layers=("relu9_9",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = PerceptualLoss(spatial_dims=3)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="spatial dims"):
        loss_fn(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))
