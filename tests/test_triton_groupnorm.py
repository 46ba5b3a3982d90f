"""The fused Triton GroupNorm + scale/shift + activation agrees with its PyTorch reference.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before
triton is imported), so the comparison runs in one subprocess for all cases. On CUDA the same
comparison runs in-process on the compiled kernels.

Run as a script (``python tests/test_triton_groupnorm.py cpu|cuda``) it performs the comparison and
prints one JSON line with the largest error per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# (name, shape, groups, affine ("w": weight, "b": bias), scale, shift, act, dtype)
CASES = [
    ("2d_all_silu", (2, 8, 8, 8), 4, "wb", True, True, "silu", torch.float32),
    ("2d_plain_identity", (2, 8, 8, 8), 4, "", False, False, "identity", torch.float32),
    ("3d_weight_scale_silu", (2, 6, 5, 6, 7), 3, "w", True, False, "silu", torch.float32),
    ("3d_g1_bias_shift_identity", (2, 6, 5, 6, 7), 1, "b", False, True, "identity", torch.float32),
    ("2d_g_eq_c_silu", (2, 8, 8, 8), 8, "wb", True, True, "silu", torch.float32),
    # S = 1600 > block: several blocks per row and split reductions merged in PyTorch.
    ("2d_multiblock_silu", (1, 2, 40, 40), 1, "wb", True, True, "silu", torch.float32),
    ("2d_all_silu_bf16", (2, 8, 8, 8), 4, "wb", True, True, "silu", torch.bfloat16),
    ("3d_all_identity_fp16", (2, 6, 5, 6, 7), 3, "wb", True, True, "identity", torch.float16),
]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _reference(x, weight, bias, scale, shift, groups, eps, act):
    """Pure PyTorch autograd reference (run in float64): F.group_norm -> * (1 + scale) + shift -> F.silu."""
    extra = (1,) * (x.dim() - 2)
    y = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale.view(*scale.shape, *extra))
    if shift is not None:
        y = y + shift.view(*shift.shape, *extra)
    return F.silu(y) if act == "silu" else y


def _max_err(a, b) -> float:
    """Largest error relative to max(1, |reference|), elementwise."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs() / b.abs().clamp_min(1.0)).max().item()


def run_cases(device: str) -> dict[str, dict[str, float]]:
    from medgen.nn.triton_groupnorm import group_norm_act_backward, group_norm_act_forward

    eps = 1e-5
    results: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * std + offset).to(device)

    for name, shape, groups, affine, has_scale, has_shift, act, dtype in CASES:
        b, c = shape[:2]
        x = rand(*shape, std=2.0, offset=3.0)  # offset: the statistics must not lose precision
        params = {
            "weight": rand(c, std=0.5, offset=1.0) if "w" in affine else None,
            "bias": rand(c, std=0.5) if "b" in affine else None,
            "scale": rand(b, c, std=0.3) if has_scale else None,
            "shift": rand(b, c, std=0.3) if has_shift else None,
        }
        grad_out = rand(*shape)
        # Inputs in the test dtype; the reference sees the same values in float64.
        x = x.to(dtype)
        grad_out = grad_out.to(dtype)
        params = {k: (v.to(dtype) if v is not None else None) for k, v in params.items()}

        ref_in = {k: v.double().requires_grad_() for k, v in params.items() if v is not None}
        x_ref = x.double().requires_grad_()
        out_ref = _reference(
            x_ref, *(ref_in.get(k) for k in ("weight", "bias", "scale", "shift")), groups, eps, act
        )
        out_ref.backward(grad_out.double())
        var_ref, mean_ref = torch.var_mean(
            x.double().reshape(b, groups, -1), dim=-1, unbiased=False
        )
        rstd_ref = torch.rsqrt(var_ref + eps)

        out, mean, rstd = group_norm_act_forward(
            x, *params.values(), num_groups=groups, eps=eps, act=act
        )
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert mean.dtype == rstd.dtype == torch.float32
        assert mean.shape == rstd.shape == (b, groups)
        grads = group_norm_act_backward(
            grad_out, x, *params.values(), mean, rstd, num_groups=groups, act=act
        )
        dx, *dparams = grads
        assert dx.dtype == dtype and dx.shape == x.shape

        errs = {
            "out": _max_err(out, out_ref),
            "mean": _max_err(mean, mean_ref),
            "rstd": _max_err(rstd, rstd_ref),
            "dx": _max_err(dx, x_ref.grad),
        }
        for key, got in zip(params, dparams, strict=True):
            if params[key] is None:
                assert got is None, key
            else:
                assert got.dtype == params[key].dtype and got.shape == params[key].shape, key
                errs["d" + key] = _max_err(got, ref_in[key].grad)
        results[name] = errs
        tol = TOL[dtype]
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"{name}: errors above {tol}: {bad}"
    return results


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# Run with triton made unimportable: other modules of the package (or torch._dynamo, which imports
# triton when present) may load it anyway, so "not in sys.modules" alone would not test this module.
_NO_TRITON = """
import ast, sys

sys.modules["triton"] = None  # any "import triton" now raises ImportError
import medgen.nn.triton_groupnorm as m

assert sys.modules["triton"] is None
assert m.available() is False
# No module-level import of triton in the source either.
for node in ast.parse(open(m.__file__).read()).body:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
    if isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
    assert not any(n.split(".")[0] == "triton" for n in names), names
"""


def test_module_import_does_not_import_triton():
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernels_match_reference_cpu_interpreter():
    if not _triton_importable():
        pytest.skip("triton is not importable")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {case[0] for case in CASES}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_reference_cuda():
    if not _triton_importable():
        pytest.skip("triton is not importable")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set; the compiled CUDA path is not exercised")
    results = run_cases("cuda")
    assert set(results) == {case[0] for case in CASES}


if __name__ == "__main__":
    print(json.dumps(run_cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
