"""Evaluation extractors built with random weights, saved in the upstream layout (key names as
upstream: MedicalNet's ``module.`` prefix and ``conv_seg`` head, torch.hub DINOv2 backbone files,
the pytorch-fid TF-Inception file), then loaded through medgen.features.weights."""

from __future__ import annotations

import pytest
import torch

from medgen.features import (
    DINOv2Features,
    DINOv2ViT,
    MedicalNetFeatures,
    MedicalNetResNet,
    RadImageNetFeatures,
    RadImageNetResNet50,
    TFInceptionFeatures,
    build_extractor,
)
from medgen.features.inception import tf_inception_v3
from medgen.features.weights import file_sha256

pytestmark = pytest.mark.usefixtures("single_thread")


def _save(state, path):
    torch.save({k: v.clone() for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def radimagenet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "RadImageNet-ResNet50_notop.pth"
    return _save(RadImageNetResNet50().state_dict(), path)


def test_radimagenet_keras_layout_loads_and_gives_2048(radimagenet_file):
    state = torch.load(radimagenet_file, weights_only=True)
    # the Keras layout: biased convolutions, stride in the first 1x1 of a bottleneck
    assert "layer1.0.conv1.bias" in state and "layer2.0.downsample.0.bias" in state
    net = RadImageNetResNet50()
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    ext, record = build_extractor("radimagenet_resnet50", 2, radimagenet_file)
    x = torch.rand(2, 1, 32, 32)
    out = ext(x)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    assert record["weights"] == radimagenet_file.name
    assert record["weights_sha256"] == file_sha256(radimagenet_file)
    # gray in == the same gray repeated to RGB
    torch.testing.assert_close(ext(x.expand(-1, 3, -1, -1)), out)
    with pytest.raises(ValueError, match="takes 2D input, not 3D; use protocol=2.5d"):
        build_extractor("radimagenet_resnet50", 3, radimagenet_file)


def test_wrong_hash_names_file_and_expected_hash(radimagenet_file):
    with pytest.raises(
        ValueError, match=rf"{radimagenet_file.name}: SHA-256 mismatch: expected 0{{64}}"
    ):
        RadImageNetFeatures(radimagenet_file, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="never downloads; get RadImageNet"):
        RadImageNetFeatures(None)


@pytest.mark.parametrize(
    "depth,shortcut,width",
    [(10, "B", 512), (18, "A", 512), pytest.param(50, "B", 2048, marks=pytest.mark.slow)],
)
def test_medicalnet_release_layout(tmp_path, depth, shortcut, width):
    torch.manual_seed(depth)
    net = MedicalNetResNet(depth, shortcut)
    # the release files: {"state_dict": {"module.<key>": ...}} with a conv_seg head
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(32, width, 3, 3, 3)
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": state}, path)
    ext = MedicalNetFeatures(path, depth=depth)
    assert ext.depth == depth and ext.net.shortcut == shortcut
    assert ext.net.layer4[0].conv2.dilation == (4, 4, 4)
    out = ext(torch.rand(2, 1, 16, 16, 16))
    assert out.shape == (2, width) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=rf"{path.name}: holds a MedicalNet ResNet-{depth}"):
        MedicalNetFeatures(path, depth=50 if depth != 50 else 10)


def test_medicalnet_keys_match_monai_medicalnet_layout():
    """MONAI's ResNet is written to load the MedicalNet files: the same keys and shapes."""
    from monai.networks.nets import resnet10

    monai_net = resnet10(
        spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False
    )
    theirs = {k: v.shape for k, v in monai_net.state_dict().items() if not k.startswith("fc.")}
    ours = {k: v.shape for k, v in MedicalNetResNet(10, "B").state_dict().items()}
    assert ours == theirs


def _dinov2_state(registers=0, swiglu=False):
    torch.manual_seed(1)
    hidden = 96 if swiglu else None
    net = DINOv2ViT(
        embed_dim=64, depth=2, registers=registers, grid=4, hidden=hidden, swiglu=swiglu
    )
    return net.state_dict()


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, True)])
def test_dinov2_hub_layout(tmp_path, registers, swiglu):
    state = _dinov2_state(registers, swiglu)
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.bias"}
    expected |= {"blocks.1.attn.qkv.weight", "blocks.1.ls1.gamma", "blocks.1.ls2.gamma"}
    expected |= {"blocks.0.mlp.w12.weight"} if swiglu else {"blocks.0.mlp.fc1.weight"}
    assert expected <= set(state)
    assert ("register_tokens" in state) == bool(registers)
    path = _save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    ext = DINOv2Features(path, input_size=56)
    assert ext.config["registers"] == registers and ext.config["depth"] == 2
    out = ext(torch.rand(3, 1, 20, 20))
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    # the class token does not depend on batch companions (no batch statistics)
    torch.testing.assert_close(
        ext(torch.rand(3, 1, 20, 20)[:1] * 0 + 0.5)[0], ext(torch.full((1, 1, 20, 20), 0.5))[0]
    )


def test_dinov2_position_embedding_resized_to_the_grid(tmp_path):
    path = _save(_dinov2_state(), tmp_path / "d.pth")
    a = DINOv2Features(path, input_size=56)  # 4x4 patches = the stored grid: used as is
    b = DINOv2Features(path, input_size=70)  # 5x5 patches: bicubic resize
    x = torch.rand(2, 3, 56, 56)
    assert a(x).shape == b(x).shape == (2, 64)
    with pytest.raises(ValueError, match="multiple of 14"):
        DINOv2Features(path, input_size=50)
    bad = _save({"a": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth: not a DINOv2 backbone state dict"):
        DINOv2Features(bad)


def test_tf_inception_pytorch_fid_layout(tmp_path):
    torch.manual_seed(2)
    net = tf_inception_v3()
    state = net.state_dict()
    assert state["fc.weight"].shape == (1008, 2048) and not any("AuxLogits" in k for k in state)
    path = _save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    ext = TFInceptionFeatures(path)
    x = torch.rand(1, 1, 64, 64)
    out = ext(x)
    assert out.shape == (1, 2048) and (out >= 0).all()  # after ReLU and an average pool
    # the pooling differs from torchvision's graph: same weights, other features
    import torchvision

    plain = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    plain.load_state_dict(state)
    plain.fc = torch.nn.Identity()
    plain.eval()
    with torch.no_grad():
        y = torch.nn.functional.interpolate(
            x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear"
        )
        assert not torch.allclose(plain(2 * y - 1), out)
    with pytest.raises(ValueError, match=r"resnet_x.pth: not a TF-Inception"):
        TFInceptionFeatures(_save({"w": torch.zeros(1)}, tmp_path / "resnet_x.pth"))


def test_registry_free_extractors():
    ext, record = build_extractor("random_conv", 3)
    assert record["weights"] is None and ext(torch.rand(2, 1, 8, 8, 8)).shape == (2, 512)
    with pytest.raises(ValueError, match="must be one of"):
        build_extractor("vgg", 2)
    with pytest.raises(ValueError, match="takes 3D input, not 2D"):
        build_extractor("medicalnet", 2)
