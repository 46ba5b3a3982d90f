"""Tests for medgen.nets.translation: pix2pix/CycleGAN generators and discriminators, 2D and 3D."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from medgen.nets.translation import (
    INIT_TYPES,
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    UnetSkipBlock,
    init_weights,
    receptive_field,
)

SPATIAL = {2: (32, 32), 3: (16, 16, 16)}
INSTANCE = (nn.InstanceNorm2d, nn.InstanceNorm3d)
BATCH = (nn.BatchNorm2d, nn.BatchNorm3d)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run these tiny nets on one thread: on a busy CPU, waiting for a second intra-op thread
    costs far more than the work (a tiny conv takes ~20 ms with 2 threads, ~0.2 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(spatial_dims: int, channels: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *SPATIAL[spatial_dims], generator=g)


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


# ------------------------------------------------------------------------------------------------
# ResNet generator
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("upsample", ["transpose", "resize_conv"])
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_resnet_generator_shapes(spatial_dims, upsample, norm):
    net = ResnetGenerator(spatial_dims, 3, 2, ngf=4, n_blocks=2, norm=norm, upsample=upsample)
    x = _x(spatial_dims, 3)
    y = net(x)
    assert y.shape == (2, 2, *SPATIAL[spatial_dims])
    assert y.abs().max() <= 1.0  # tanh
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_resnet_generator_layout(spatial_dims):
    net = ResnetGenerator(spatial_dims, 1, 1, ngf=4, n_blocks=3)
    convs = _convs(net)
    # 7-conv, 2 downs, 2 per residual block, 2 ups, 7-conv
    assert len(convs) == 1 + 2 + 2 * 3 + 2 + 1
    assert convs[0].kernel_size == (7,) * spatial_dims
    assert convs[0].padding_mode == "reflect"
    assert [c.out_channels for c in convs[:3]] == [4, 8, 16]
    assert isinstance(convs[-3], (nn.ConvTranspose2d, nn.ConvTranspose3d))
    resize = ResnetGenerator(spatial_dims, 1, 1, ngf=4, n_blocks=1, upsample="resize_conv")
    assert not any(isinstance(c, (nn.ConvTranspose2d, nn.ConvTranspose3d)) for c in _convs(resize))
    assert sum(isinstance(m, nn.Upsample) for m in resize.modules()) == 2


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_instance_norm_is_not_affine_and_bias_rule(spatial_dims):
    inst = ResnetGenerator(spatial_dims, 1, 1, ngf=4, n_blocks=1, norm="instance")
    norms = [m for m in inst.modules() if isinstance(m, INSTANCE)]
    assert norms and all(not n.affine and n.weight is None and n.bias is None for n in norms)
    assert all(c.bias is not None for c in _convs(inst))
    none = ResnetGenerator(spatial_dims, 1, 1, ngf=4, n_blocks=1, norm="none")
    assert all(c.bias is not None for c in _convs(none))
    batch = ResnetGenerator(spatial_dims, 1, 1, ngf=4, n_blocks=1, norm="batch")
    assert any(isinstance(m, BATCH) for m in batch.modules())
    convs = _convs(batch)
    assert all(c.bias is None for c in convs[:-1])  # every conv followed by batch norm
    assert convs[-1].bias is not None  # the output conv
    # An explicit (name, kwargs) tuple is respected.
    aff = ResnetGenerator(
        spatial_dims, 1, 1, ngf=4, n_blocks=1, norm=("instance", {"affine": True})
    )
    assert all(m.affine for m in aff.modules() if isinstance(m, INSTANCE))
    assert all(c.bias is None for c in _convs(aff)[:-1])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_global_residual(spatial_dims):
    torch.manual_seed(0)
    net = ResnetGenerator(spatial_dims, 2, 2, ngf=4, n_blocks=1, global_residual=True)
    x = _x(spatial_dims, 2)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    torch.testing.assert_close(net(x), torch.tanh(x))
    # Without the global residual a zeroed head gives tanh(0) = 0.
    plain = ResnetGenerator(spatial_dims, 2, 2, ngf=4, n_blocks=1)
    with torch.no_grad():
        plain.head.weight.zero_()
        plain.head.bias.zero_()
    assert plain(x).abs().max() == 0
    # With random weights, the residual output differs from the plain one by exactly x
    # (before tanh).
    plain_nt = ResnetGenerator(spatial_dims, 2, 2, ngf=4, n_blocks=1, final_act=None)
    res_nt = ResnetGenerator(spatial_dims, 2, 2, ngf=4, n_blocks=1, final_act=None)
    res_nt.global_residual = True
    res_nt.load_state_dict(plain_nt.state_dict())
    torch.testing.assert_close(res_nt(x) - plain_nt(x), x)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        ResnetGenerator(spatial_dims, 1, 3, global_residual=True)


def test_resnet_generator_bad_args():
    with pytest.raises(ValueError, match="upsample"):
        ResnetGenerator(2, 1, 1, upsample="bilinear")
    with pytest.raises(ValueError, match="padding_type"):
        ResnetGenerator(2, 1, 1, padding_type="circularish")
    with pytest.raises(ValueError, match="spatial_dims"):
        ResnetGenerator(1, 1, 1)


@pytest.mark.parametrize("padding_type", ["reflect", "replicate", "zero"])
def test_resnet_padding_types(padding_type):
    net = ResnetGenerator(2, 1, 1, ngf=4, n_blocks=1, padding_type=padding_type)
    assert net(_x(2, 1)).shape == (2, 1, 32, 32)


# ------------------------------------------------------------------------------------------------
# UNet generator
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spatial_dims, num_downs, norm",
    [(2, 5, "batch"), (2, 5, "instance"), (2, 5, "none"), (3, 4, "batch"), (3, 4, "instance")],
)
def test_unet_generator_shapes(spatial_dims, num_downs, norm):
    net = UnetGenerator(spatial_dims, 3, 2, num_downs=num_downs, ngf=4, norm=norm)
    x = _x(spatial_dims, 3)
    y = net(x)
    assert y.shape == (2, 2, *SPATIAL[spatial_dims])
    assert y.abs().max() <= 1.0
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("num_downs, expected_down", [(8, 8), (7, 7), (5, 5)])
def test_unet_layout_matches_upstream(num_downs, expected_down):
    net = UnetGenerator(2, 3, 3, num_downs=num_downs, ngf=64)
    downs = [c for c in _convs(net) if isinstance(c, nn.Conv2d)]
    assert len(downs) == expected_down
    assert [c.out_channels for c in downs[:5]] == [64, 128, 256, 512, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in downs)
    # upstream pix2pix prints 54.414 M parameters for unet_256 (3 -> 3 channels, batch norm)
    if num_downs == 8:
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 3) == 54.414


def test_parameter_counts_match_upstream():
    def millions(m):
        return round(sum(p.numel() for p in m.parameters()) / 1e6, 3)

    # numbers printed by upstream CycleGAN (resnet_9blocks, basic D, instance) and pix2pix (D, batch)
    assert millions(ResnetGenerator(2, 3, 3, norm="instance")) == 11.378
    assert millions(NLayerDiscriminator(2, 3, norm="instance")) == 2.765
    assert millions(NLayerDiscriminator(2, 6, norm="batch")) == 2.769


def test_unet_dropout_placement_and_train_eval():
    for num_downs, n_drop in [(8, 3), (7, 2), (5, 0), (6, 1)]:
        net = UnetGenerator(2, 1, 1, num_downs=num_downs, ngf=2, use_dropout=True)
        drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
        assert len(drops) == n_drop and all(d.p == 0.5 for d in drops)
    net = UnetGenerator(2, 1, 1, num_downs=6, ngf=2, use_dropout=True)
    x = torch.randn(2, 1, 64, 64)
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    b = net(x)
    assert not torch.allclose(a, b)
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def test_resnet_dropout_train_eval():
    net = ResnetGenerator(2, 1, 1, ngf=4, n_blocks=2, use_dropout=True)
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    x = _x(2, 1)
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def test_unet_bad_input_size():
    net = UnetGenerator(2, 1, 1, num_downs=5, ngf=2)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(1, 1, 48, 48))
    with pytest.raises(ValueError, match="num_downs"):
        UnetGenerator(2, 1, 1, num_downs=1)


# ------------------------------------------------------------------------------------------------
# discriminators
# ------------------------------------------------------------------------------------------------
def test_patchgan_output_size_256():
    d = NLayerDiscriminator(2, 6, ndf=4, n_layers=3)
    out = d(torch.randn(1, 6, 256, 256))
    assert out.shape == (1, 1, 30, 30)
    assert d.receptive_field == 70


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_patchgan_shapes(spatial_dims, norm):
    d = NLayerDiscriminator(spatial_dims, 2, ndf=4, n_layers=2, norm=norm)
    size = 32 if spatial_dims == 2 else 16
    out = d(torch.randn(2, 2, *(size,) * spatial_dims))
    expected = size // 4 - 2  # two stride-2 layers, then two k4/p1/s1 layers (-1 each)
    assert out.shape == (2, 1, *(expected,) * spatial_dims)


def test_receptive_field_values():
    assert receptive_field(3) == 70
    assert [receptive_field(n) for n in (1, 2, 4)] == [16, 34, 142]
    with pytest.raises(ValueError):
        receptive_field(0)


def test_receptive_field_empirical():
    torch.manual_seed(0)
    d = NLayerDiscriminator(2, 1, ndf=2, n_layers=3, norm="none").double()
    x = torch.randn(1, 1, 128, 128, dtype=torch.double, requires_grad=True)
    out = d(x)
    assert out.shape[-2:] == (14, 14)
    out[0, 0, 7, 7].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    cols = x.grad[0, 0].abs().sum(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == receptive_field(3) == 70
    assert cols.max() - cols.min() + 1 == 70


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_pixel_discriminator(spatial_dims, norm):
    d = PixelDiscriminator(spatial_dims, 3, ndf=4, norm=norm)
    x = _x(spatial_dims, 3)
    assert d(x).shape == (2, 1, *SPATIAL[spatial_dims])
    assert all(c.kernel_size == (1,) * spatial_dims for c in _convs(d))
    # Per-pixel: changing one pixel changes only that output pixel (eval: no batch statistics).
    d.eval()
    x2 = x.clone()
    x2[(0, slice(None)) + (3,) * spatial_dims] += 1.0
    diff = (d(x2) - d(x)).abs() > 0
    if norm != "instance":  # instance norm mixes a sample's statistics across pixels
        assert diff.sum() == 1


# ------------------------------------------------------------------------------------------------
# init_weights
# ------------------------------------------------------------------------------------------------
def test_init_weights_normal_statistics():
    torch.manual_seed(0)
    net = init_weights(NLayerDiscriminator(2, 3, ndf=64, n_layers=3), "normal", 0.02)
    weights = torch.cat([c.weight.flatten() for c in _convs(net)])
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert abs(weights.mean().item()) < 1e-3
    for c in _convs(net):
        if c.bias is not None:
            assert torch.all(c.bias == 0)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    w = torch.cat([b.weight for b in bns])
    assert abs(w.mean().item() - 1.0) < 5e-3 and abs(w.std().item() - 0.02) < 5e-3
    assert all(torch.all(b.bias == 0) for b in bns)


@pytest.mark.parametrize("init_type", INIT_TYPES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_init_weights_all_types(init_type, spatial_dims):
    torch.manual_seed(0)
    net = ResnetGenerator(spatial_dims, 1, 1, ngf=4, n_blocks=1, norm="batch")
    assert init_weights(net, init_type) is net
    for c in _convs(net):
        assert torch.isfinite(c.weight).all() and c.weight.abs().sum() > 0
    if init_type == "orthogonal":
        w = _convs(net)[2].weight.flatten(1)  # 16 x (8 * 3^d): orthonormal rows, scaled by gain
        torch.testing.assert_close(w @ w.T, 0.02**2 * torch.eye(w.shape[0]), atol=1e-6, rtol=0)
    if init_type == "kaiming":
        w = _convs(net)[1].weight
        fan_in = w[0].numel()
        assert abs(w.std().item() - (2 / fan_in) ** 0.5) < 0.3 * (2 / fan_in) ** 0.5


def test_init_weights_unknown_type():
    with pytest.raises(ValueError, match="'normal', 'xavier', 'kaiming', 'orthogonal'"):
        init_weights(nn.Conv2d(1, 1, 3), "uniformish")


# ------------------------------------------------------------------------------------------------
# plain kwargs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ResnetGenerator, {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "ngf": 4,
                           "n_blocks": 1, "norm": ["instance", {"affine": False}],
                           "upsample": "resize_conv", "global_residual": True, "final_act": None}),
        (UnetGenerator, {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_downs": 4,
                         "ngf": 2, "norm": "batch"}),
        (NLayerDiscriminator, {"spatial_dims": 3, "in_channels": 2, "ndf": 2, "n_layers": 2}),
        (PixelDiscriminator, {"spatial_dims": 2, "in_channels": 2, "ndf": 2, "norm": "none"}),
    ],
)  # fmt: skip
def test_json_kwargs_round_trip(cls, kwargs):
    rebuilt = cls(**json.loads(json.dumps(kwargs)))
    original = cls(**kwargs)
    rebuilt.load_state_dict(original.state_dict())


# ------------------------------------------------------------------------------------------------
# gradient checkpointing
# ------------------------------------------------------------------------------------------------
CKPT_NETS = [
    pytest.param(lambda: ResnetGenerator(2, 2, 2, ngf=4, n_blocks=2, norm="batch"), 2, 16, id="resnet-batch"),
    pytest.param(lambda: ResnetGenerator(3, 2, 2, ngf=4, n_blocks=1, use_dropout=True,
                                         norm=("instance", {"track_running_stats": True})),
                 3, 8, id="resnet-dropout-tracked-instance"),
    pytest.param(lambda: UnetGenerator(2, 2, 2, num_downs=6, ngf=2, use_dropout=True), 2, 64, id="unet-dropout"),
    pytest.param(lambda: UnetGenerator(3, 2, 2, num_downs=3, ngf=4, norm=("batch", {"momentum": None})),
                 3, 8, id="unet-cumulative-bn"),
    pytest.param(lambda: NLayerDiscriminator(2, 2, ndf=4, n_layers=2), 2, 32, id="patchgan"),
    pytest.param(lambda: PixelDiscriminator(3, 2, ndf=4), 3, 8, id="pixel"),
]  # fmt: skip


def _train_step(net, x, checkpointing, calls=1):
    """Forward ``calls`` batches (as a GAN discriminator sees real and fake), then one backward."""
    net = copy.deepcopy(net).train()
    net.gradient_checkpointing = checkpointing
    torch.manual_seed(0)  # the same dropout masks
    outs = [net(x + i) for i in range(calls)]
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in net.parameters()]
    return [o.detach() for o in outs], grads, [b.clone() for b in net.buffers()], net


@pytest.mark.parametrize("make, spatial_dims, size", CKPT_NETS)
@pytest.mark.parametrize("calls", [1, 2])
def test_gradient_checkpointing_is_exact(make, spatial_dims, size, calls):
    torch.manual_seed(0)
    net = make()
    x = torch.randn(2, 2, *(size,) * spatial_dims)
    plain = _train_step(net, x, False, calls)
    ckpt = _train_step(net, x, True, calls)
    for a, b in zip(plain[:3], ckpt[:3], strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(v, u, rtol=0, atol=0)
    # Norm running statistics moved once per forward (recomputation restores them), so they
    # equal the plain run's: a second update would change running_mean and num_batches_tracked.
    counts = [m.num_batches_tracked.item() for m in ckpt[3].modules() if isinstance(m, BATCH)]
    assert counts == [calls] * len(counts)


def _saved_bytes(net, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(storages.values())


@pytest.mark.parametrize(
    "net, size, ratio",
    [
        (UnetGenerator(2, 2, 2, num_downs=5, ngf=8), 64, 0.4),
        (ResnetGenerator(2, 2, 2, ngf=8, n_blocks=4), 64, 0.45),
        (NLayerDiscriminator(2, 2, ndf=8), 64, 0.55),
        (PixelDiscriminator(2, 2, ndf=8), 64, 0.7),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_gradient_checkpointing_saves_memory(net, size, ratio):
    # Bytes kept for backward (deterministic, unlike timings): the UNet checkpoints each level's
    # own down and up layers, not the whole recursion, so its saving is the largest.
    x = torch.randn(2, 2, size, size)
    net.train()
    plain = _saved_bytes(net, x)
    net.gradient_checkpointing = True
    assert _saved_bytes(net, x) < ratio * plain
    net.eval()  # no checkpointing outside training
    with torch.no_grad():
        net(x)


def test_gradient_checkpointing_toggle_and_state_dict():
    for cls, args, kwargs in [
        (ResnetGenerator, (2, 3, 3), {"ngf": 4, "n_blocks": 2}),
        (UnetGenerator, (3, 1, 1), {"num_downs": 4, "ngf": 2}),
        (NLayerDiscriminator, (2, 6), {"ndf": 4}),
        (PixelDiscriminator, (3, 2), {"ndf": 4}),
    ]:
        plain = cls(*args, **kwargs)
        ckpt = cls(*args, **kwargs, gradient_checkpointing=True)
        assert not plain.gradient_checkpointing and ckpt.gradient_checkpointing
        assert list(plain.state_dict()) == list(ckpt.state_dict())
        assert sum(p.numel() for p in plain.parameters()) == sum(
            p.numel() for p in ckpt.parameters()
        )
        plain.gradient_checkpointing = True
        assert plain.gradient_checkpointing is True
    # The UNet's flag reaches every level of the recursion.
    unet = UnetGenerator(2, 1, 1, num_downs=4, ngf=2)
    unet.gradient_checkpointing = True
    assert all(b.gradient_checkpointing for b in unet.modules() if isinstance(b, UnetSkipBlock))
    unet.gradient_checkpointing = False
    assert not any(b.gradient_checkpointing for b in unet.modules() if isinstance(b, UnetSkipBlock))


def test_compiled_checkpointed_training_step_matches_eager():
    # Under torch.compile, AOTAutograd recomputes the checkpointed stages functionally: batch norm
    # statistics are updated once and gradients match the plain eager step.
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = NLayerDiscriminator(2, 2, ndf=4, n_layers=1)
    x = torch.randn(2, 2, 16, 16)
    _, grads, buffers, _ = _train_step(net, x, False)
    net.train()
    net.gradient_checkpointing = True
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    for b, ref in zip(net.buffers(), buffers, strict=True):
        torch.testing.assert_close(b, ref)
    torch._dynamo.reset()
