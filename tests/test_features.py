"""Tests for medgen.features: local weights (SHA-256, safe loading, errors naming the file), and
that the old import paths of the extractors still work."""

from __future__ import annotations

import hashlib

import pytest
import torch

import medgen.features as features
from medgen.features.weights import (
    check_sha256,
    file_sha256,
    load_state_dict,
    local_weights_file,
    offline_instructions,
)


def test_old_import_paths_are_the_same_objects():
    from medgen.losses import VGGFeatures
    from medgen.losses.perceptual import DEFAULT_LAYERS, resolve_layer
    from medgen.metrics import PixelFeatures, RandomConvFeatures, TorchvisionFeatures

    assert VGGFeatures is features.VGGFeatures
    assert resolve_layer is features.resolve_layer and DEFAULT_LAYERS is features.DEFAULT_LAYERS
    assert PixelFeatures is features.PixelFeatures
    assert RandomConvFeatures is features.RandomConvFeatures
    assert TorchvisionFeatures is features.TorchvisionFeatures


def test_imagenet_mean_std():
    mean, std = features.imagenet_mean_std()
    assert mean.shape == std.shape == (1, 3, 1, 1)
    assert tuple(mean.flatten().tolist()) == pytest.approx(features.IMAGENET_MEAN)
    assert tuple(std.flatten().tolist()) == pytest.approx(features.IMAGENET_STD)


def test_sha256(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"medgen" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == digest
    check_sha256(path, digest.upper())
    with pytest.raises(ValueError, match=rf"{path.name}: SHA-256 mismatch"):
        check_sha256(path, "0" * 64)


def test_local_weights_file(tmp_path):
    how = offline_instructions("vgg19", "https://example.invalid/vgg19.pth", "vgg19.pth")
    assert "never downloads" in how and "'vgg19.pth'" in how
    with pytest.raises(FileNotFoundError, match="no weights_path given for vgg19: .*; hint"):
        local_weights_file(None, "vgg19", how, unset_hint="; hint")
    with pytest.raises(FileNotFoundError, match="missing.pth: vgg19 weights file not found"):
        local_weights_file(tmp_path / "missing.pth", "vgg19", how)
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, path)
    assert local_weights_file(str(path), "vgg19", how, sha256=file_sha256(path)) == path
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        local_weights_file(path, "vgg19", how, sha256="f" * 64)


def test_load_state_dict_unwraps_and_strips_prefix(tmp_path):
    weight = torch.arange(4.0)
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": {"module.layer.weight": weight}, "epoch": 3}, path)
    state = load_state_dict(path)
    assert list(state) == ["layer.weight"]
    torch.testing.assert_close(state["layer.weight"], weight)

    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({"layer.weight": weight}, str(st))
    torch.testing.assert_close(load_state_dict(st)["layer.weight"], weight)


def test_load_state_dict_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pth: cannot read a state dict"):
        load_state_dict(corrupt)
    code = tmp_path / "code.pth"
    torch.save({"fn": hashlib.sha256}, code)  # a pickle of more than tensors: refused
    with pytest.raises(ValueError, match="code.pth: cannot read a state dict"):
        load_state_dict(code)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ValueError, match="list.pth: expected a state dict, got list"):
        load_state_dict(not_dict)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_state_dict(tmp_path / "absent.pth")


def test_torchvision_features_corrupt_file_names_it(tmp_path):
    corrupt = tmp_path / "resnet.pth"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="resnet.pth: cannot read a state dict"):
        features.TorchvisionFeatures("resnet50", corrupt)
