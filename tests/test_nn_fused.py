"""The fused GroupNorm + scale-shift + SiLU: values, gradients, memory, layouts and dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgen.nn import ResBlock
from medgen.nn.fused import (
    GroupNormAct,
    fused_backend,
    group_norm_act,
    norm_act,
    set_fused_backend,
)
from medgen.utils.memory import saved_tensor_bytes

CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def composite(x, groups, w, b, scale, shift, act):
    """The unfused reference: F.group_norm → (1 + scale), shift → SiLU."""
    y = F.group_norm(x, groups, w, b, 1e-5)
    extra = (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.reshape(scale.shape + extra))
    if shift is not None:
        y = y + shift.reshape(shift.shape + extra)
    return F.silu(y) if act == "silu" else y


CASES = [
    # shape, groups, scale-shift, act
    ((2, 8, 5, 6), 4, True, "silu"),
    ((2, 8, 5, 6), 8, False, "silu"),
    ((2, 6, 3, 4, 5), 3, True, "silu"),
    ((2, 6, 3, 4, 5), 1, False, "identity"),
    ((1, 4, 7), 2, True, "identity"),
]


@pytest.mark.parametrize(("shape", "groups", "ss", "act"), CASES)
def test_gradcheck_float64(shape, groups, ss, act):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)

    x, w, b = r(*shape), r(c), r(c)
    extra = (r(shape[0], c), r(shape[0], c)) if ss else ()

    def f(x, w, b, *sc):
        return group_norm_act(x, groups, w, b, 1e-5, *(sc or (None, None)), act=act)

    assert torch.autograd.gradcheck(f, (x, w, b, *extra))


@pytest.mark.parametrize(("shape", "groups", "ss", "act"), CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_composite_fp32(shape, groups, ss, act, layout):
    gen = torch.Generator().manual_seed(1)
    c = shape[1]
    x = torch.randn(*shape, generator=gen) * 3 + 2
    if layout == "channels_last":
        if x.dim() not in (4, 5):
            pytest.skip("channels-last needs 2D or 3D spatial input")
        x = x.contiguous(memory_format=CHANNELS_LAST[x.dim() - 2])
    params = [torch.randn(c, generator=gen), torch.randn(c, generator=gen)]
    params += [torch.randn(shape[0], c, generator=gen) for _ in range(2)] if ss else [None, None]
    leaves_a = [x.clone().requires_grad_()] + [
        p.clone().requires_grad_() if p is not None else None for p in params
    ]
    leaves_b = [x.clone().requires_grad_()] + [
        p.clone().requires_grad_() if p is not None else None for p in params
    ]
    xa, wa, ba, sa, ha = leaves_a
    xb, wb, bb, sb, hb = leaves_b
    out = group_norm_act(xa, groups, wa, ba, 1e-5, sa, ha, act)
    ref = composite(xb, groups, wb, bb, sb, hb, act)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=CHANNELS_LAST[x.dim() - 2])
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-5)
    if layout == "channels_last":
        assert xa.grad.is_contiguous(memory_format=CHANNELS_LAST[x.dim() - 2])


def test_saves_only_the_input_and_statistics():
    # Composite GN → scale-shift → SiLU keeps the GN input, GN output, (1 + scale), the
    # scale-shift output and more; the fused op keeps the input, the (B, C) conditioning and (B, G)
    # statistics only.
    x = torch.randn(2, 16, 8, 8, 8, requires_grad=True)
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    s, h = torch.zeros(2, 16, requires_grad=True), torch.zeros(2, 16, requires_grad=True)
    full = x.numel() * 4
    fused = saved_tensor_bytes(lambda: group_norm_act(x, 4, w, b, 1e-5, s, h))
    unfused = saved_tensor_bytes(lambda: composite(x, 4, w, b, s, h, "silu"))
    assert full <= fused < full + 4096
    assert unfused >= 3 * full


def test_resblock_saves_less_than_unfused():
    torch.manual_seed(0)
    block = ResBlock(3, 16, 16, emb_channels=8, norm_num_groups=4)
    x = torch.randn(2, 16, 8, 8, 8)
    emb = torch.randn(2, 8)
    fused = saved_tensor_bytes(lambda: block(x.requires_grad_(), emb))

    class Unfused(nn.Module):
        def forward(self, x, emb):
            h = block.conv1(block.act1(block.norm1(x)))
            scale, shift = block.emb_proj(emb).chunk(2, dim=1)
            h = block.norm2(h) * (1 + scale[..., None, None, None]) + shift[..., None, None, None]
            return block.skip(x) + block.conv2(block.act2(h))

    unfused_net = Unfused()
    torch.testing.assert_close(block(x, emb), unfused_net(x, emb), atol=1e-5, rtol=1e-5)
    unfused = saved_tensor_bytes(lambda: unfused_net(x, emb))
    assert fused <= 0.7 * unfused


def test_bfloat16_close_to_float32():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=gen)
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    out = group_norm_act(x.bfloat16(), 4, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), group_norm_act(x, 4, w, b), atol=3e-2, rtol=3e-2)
    xb = x.bfloat16().requires_grad_()
    wp = w.clone().requires_grad_()
    group_norm_act(xb, 4, wp, b).sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and wp.grad.dtype == torch.float32


def test_inference_path_needs_no_graph():
    x = torch.randn(2, 8, 4, 4)
    norm = GroupNormAct(4, 8)
    with torch.no_grad():
        out = norm(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 4, norm.weight, norm.bias)))


def test_group_norm_act_module_is_a_drop_in_for_groupnorm_silu():
    ref = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU())
    nn.init.normal_(ref[0].weight)
    nn.init.normal_(ref[0].bias)
    mod = GroupNormAct(4, 8)
    mod.load_state_dict(ref[0].state_dict())
    assert set(mod.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 8, 5, 5, 5)
    torch.testing.assert_close(mod(x), ref(x))
    assert "act=silu" in repr(mod)


def test_norm_act_falls_back_for_other_norms_and_activations():
    x = torch.randn(2, 8, 5, 5)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)
    inorm, gelu = nn.InstanceNorm2d(8, affine=True), nn.GELU()
    expected = gelu(inorm(x) * (1 + scale[..., None, None]) + shift[..., None, None])
    torch.testing.assert_close(norm_act(inorm, gelu, x, scale, shift), expected)
    gn = nn.GroupNorm(2, 8)
    torch.testing.assert_close(norm_act(gn, nn.Identity(), x), gn(x))


def test_cpu_always_runs_the_reference():
    x = torch.randn(1, 4, 2, 2)
    try:
        for backend in ("auto", "reference", "triton"):
            set_fused_backend(backend)
            assert fused_backend(x) == "reference"
    finally:
        set_fused_backend("auto")
    with pytest.raises(ValueError, match="Unknown fused backend"):
        set_fused_backend("cuda")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="divisible by num_groups=3"):
        group_norm_act(torch.randn(1, 4, 2, 2), 3)
    with pytest.raises(ValueError, match="Unknown activation 'relu'"):
        group_norm_act(torch.randn(1, 4, 2, 2), 2, act="relu")


def test_compiles_without_graph_breaks():
    norm = GroupNormAct(2, 4)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    scale, shift = torch.randn(2, 4), torch.randn(2, 4)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    out = compiled(x, scale, shift)
    torch.testing.assert_close(out, norm(x, scale, shift))
    out.sum().backward()
    assert x.grad is not None
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_path_matches_reference_on_cuda():
    from medgen.nn import triton_groupnorm

    if not triton_groupnorm.available():
        pytest.skip("Triton is not installed")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 8, 8, 8, generator=gen)
    w, b = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    s, h = torch.randn(2, 32, generator=gen), torch.randn(2, 32, generator=gen)
    cpu = [t.clone().requires_grad_() for t in (x, w, b, s, h)]
    gpu = [t.cuda().requires_grad_() for t in (x, w, b, s, h)]
    assert fused_backend(gpu[0]) == "triton"
    out_c = group_norm_act(cpu[0], 8, *cpu[1:3], 1e-5, *cpu[3:])
    out_g = group_norm_act(gpu[0], 8, *gpu[1:3], 1e-5, *gpu[3:])
    torch.testing.assert_close(out_g.cpu(), out_c, atol=1e-5, rtol=1e-5)
    out_c.square().sum().backward()
    out_g.square().sum().backward()
    for a, b_ in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b_.grad.cpu(), a.grad, atol=1e-4, rtol=1e-5)


def test_composed_norm_act_activates_in_place_only_without_grad():
    """A swapped (non-fusable) norm still costs one activation-sized tensor in inference."""
    from medgen.nn.fused import norm_act

    class Wrapped(torch.nn.Module):  # what tiled decoding swaps GroupNorms for
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.GroupNorm(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)

    norm, act = Wrapped(), torch.nn.SiLU()
    produced: list[torch.Tensor] = []
    norm.register_forward_hook(lambda module, args, out: produced.append(out))
    x = torch.randn(2, 4, 6, 6)
    expected = torch.nn.functional.silu(norm.norm(x))
    with torch.no_grad():
        y = norm_act(norm, act, x)
    torch.testing.assert_close(y, expected)
    assert y.data_ptr() == produced[-1].data_ptr()  # activated in place, no second tensor
    y = norm_act(norm, act, x.requires_grad_())
    torch.testing.assert_close(y, expected)
    assert y.data_ptr() != produced[-1].data_ptr()  # autograd keeps the norm's output
    y.sum().backward()
    assert x.grad is not None
