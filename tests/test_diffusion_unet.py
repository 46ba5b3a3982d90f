"""Tests for :class:`medgen.nets.diffusion_unet.DiffusionUNet` and :class:`medgen.nn.CrossAttention`."""

from __future__ import annotations

import time

import pytest
import torch

from medgen.nets.diffusion_unet import DiffusionUNet
from medgen.nn.cross_attention import CrossAttention

TINY = dict(
    in_channels=1,
    out_channels=2,
    channels=(8, 16, 16),
    attention_levels=(False, True, True),
    num_res_blocks=1,
    num_head_channels=8,
    norm_num_groups=8,
)
SHAPES = {2: (16, 16), 3: (8, 8, 8)}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run these tiny nets on one thread: intra-op threads only add contention at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [
    pytest.param(2, {}, id="2d"),
    pytest.param(3, {}, id="3d"),
    pytest.param(2, dict(num_res_blocks=(1, 2, 1), num_head_channels=(8, 4, 8)), id="2d-perlevel"),
    pytest.param(3, dict(resblock_updown=True), id="3d-updown"),
    pytest.param(2, dict(scale_shift=True, dropout=0.1), id="2d-scaleshift"),
]

MONAI_CFG = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    channels=(8, 16, 16),
    attention_levels=(False, False, True),
    num_res_blocks=1,
    num_head_channels=8,
    norm_num_groups=8,
)


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _perturb_out(net: DiffusionUNet) -> DiffusionUNet:
    """Give the zero-initialised output conv (and zero-init residual branches) random weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _inputs(spatial_dims: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *SHAPES[spatial_dims], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


@pytest.mark.parametrize("spatial_dims, extra", CASES)
def test_output_shape(spatial_dims: int, extra: dict) -> None:
    net = DiffusionUNet(spatial_dims, **{**TINY, **extra})
    x, t = _inputs(spatial_dims)
    y = net(x, t)
    assert y.shape == (2, 2, *SHAPES[spatial_dims])
    # The output conv is zero-initialised.
    assert torch.count_nonzero(y) == 0
    # One timestep for the whole batch broadcasts.
    assert net(x, t[:1]).shape == y.shape


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_class_conditioning_changes_output(spatial_dims: int) -> None:
    net = _perturb_out(DiffusionUNet(spatial_dims, **TINY, num_class_embeds=3)).eval()
    x, t = _inputs(spatial_dims)
    y0 = net(x, t, class_labels=torch.tensor([0, 0]))
    y1 = net(x, t, class_labels=torch.tensor([1, 2]))
    assert y0.abs().sum() > 0
    assert not torch.allclose(y0, y1)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cross_attention_conditioning(spatial_dims: int) -> None:
    net = DiffusionUNet(
        spatial_dims,
        **TINY,
        with_conditioning=True,
        cross_attention_dim=6,
        transformer_num_layers=2,
    )
    net = _perturb_out(net).eval()
    x, t = _inputs(spatial_dims)
    c0 = torch.randn(2, 5, 6)
    y0 = net(x, t, context=c0)
    y1 = net(x, t, context=c0 + 1.0)
    assert y0.shape == (2, 2, *SHAPES[spatial_dims])
    assert not torch.allclose(y0, y1)
    loss = y0.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="context"):
        net(x, t)


def test_context_without_conditioning_raises() -> None:
    net = DiffusionUNet(2, **TINY)
    x, t = _inputs(2)
    with pytest.raises(ValueError, match="with_conditioning"):
        net(x, t, context=torch.randn(2, 1, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(with_conditioning=True), "cross_attention_dim"),
        (dict(cross_attention_dim=4), "with_conditioning"),
        (dict(attention_levels=(False, True)), "attention_levels"),
        (dict(num_res_blocks=(1, 1)), "num_res_blocks"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(num_head_channels=(8, 8)), "num_head_channels"),
        (dict(num_head_channels=3), "divisible"),
        (dict(dropout=1.5), "dropout"),
        (dict(spatial_dims=1), "spatial_dims"),
        (dict(channels=()), "channels"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    cfg = {**MONAI_CFG, **kwargs}
    with pytest.raises(ValueError, match=match):
        DiffusionUNet(**cfg)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradient_checkpointing_matches(spatial_dims: int) -> None:
    cfg = dict(TINY, with_conditioning=True, cross_attention_dim=4, num_class_embeds=2)
    torch.manual_seed(0)
    ref = _perturb_out(DiffusionUNet(spatial_dims, **cfg)).train()
    ckpt = DiffusionUNet(spatial_dims, **cfg, gradient_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x, t = _inputs(spatial_dims)
    c = torch.randn(2, 3, 4)
    labels = torch.tensor([0, 1])
    outs, grads = [], []
    for net in (ref, ckpt):
        xi = x.clone().requires_grad_(True)
        y = net(xi, t, context=c, class_labels=labels)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    for g0, g1 in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_matches(spatial_dims: int) -> None:
    net = _perturb_out(DiffusionUNet(spatial_dims, **TINY)).eval()
    x, t = _inputs(spatial_dims)
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    with torch.no_grad():
        y = net(x, t)
        net_cl = net.to(memory_format=fmt)
        y_cl = net_cl(x.contiguous(memory_format=fmt), t)
    torch.testing.assert_close(y_cl, y, atol=1e-5, rtol=0)


def test_monai_config_dict_and_param_count() -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    ours = DiffusionUNet(**MONAI_CFG)
    theirs = monai_nets.DiffusionModelUNet(**MONAI_CFG)
    x, t = _inputs(2)
    assert ours(x, t).shape == theirs(x, t).shape == x.shape
    n_ours, n_theirs = _num_params(ours), _num_params(theirs)
    print(f"params: medgen DiffusionUNet {n_ours}, MONAI DiffusionModelUNet {n_theirs}")
    assert n_ours == n_theirs  # same layout (tests/test_nets_monai_compat.py compares outputs)


def test_no_graph_breaks() -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    net = DiffusionUNet(**MONAI_CFG).eval()
    x, t = _inputs(2)
    dynamo.reset()
    start = time.perf_counter()
    explanation = dynamo.explain(net)(x, t)
    elapsed = time.perf_counter() - start
    dynamo.reset()
    if elapsed > 20.0:
        pytest.skip(f"torch._dynamo.explain took {elapsed:.1f} s (> 20 s)")
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cross_attention_block(spatial_dims: int) -> None:
    block = CrossAttention(spatial_dims, 16, context_dim=5, num_head_channels=4, norm_num_groups=8)
    x = torch.randn(2, 16, *SHAPES[spatial_dims][:spatial_dims])
    ctx = torch.randn(2, 3, 5)
    # Zero-initialised output projection: a new block is the identity.
    torch.testing.assert_close(block(x, ctx), x)
    with torch.no_grad():
        block.proj_out.weight.normal_()
    y = block(x, ctx)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(spatial_dims, 16, 5, num_head_channels=3)


def test_gradient_checkpointing_saves_memory() -> None:
    """Activation checkpointing stores fewer bytes for backward (deterministic measure)."""

    def saved_bytes(net: DiffusionUNet) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x, t = _inputs(2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x, t).sum()
        return total

    plain = DiffusionUNet(**MONAI_CFG).train()
    ckpt = DiffusionUNet(**MONAI_CFG, gradient_checkpointing=True).train()
    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)
