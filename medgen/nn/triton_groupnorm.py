"""Fused GroupNorm + per-sample scale/shift + activation in Triton, forward and backward.

Computes, per sample ``b`` and group ``g`` (the ``C // G`` channels of the group and every spatial
position, ``S = prod(spatial)``)::

    mean, rstd = mean(x), 1 / sqrt(var(x) + eps)      # biased variance, float32
    xhat = (x - mean) * rstd
    y = xhat * weight[c] + bias[c]                     # weight/bias may be None (1 / 0)
    z = y * (1 + scale[b, c]) + shift[b, c]            # scale/shift (B, C) may be None
    out = silu(z) if act == "silu" else z

Why our own kernels (DESIGN.md: "write our own only where it is measurably better"): eager PyTorch
runs this as four kernels and keeps ``xhat``, ``y`` and ``z`` alive for backward; here the forward
is one statistics kernel plus one elementwise kernel, and the backward saves nothing but ``x``,
``mean`` and ``rstd`` -- it recomputes ``xhat`` and ``z`` on the fly. The pure-PyTorch reference
is ``F.group_norm`` -> scale/shift -> ``F.silu``; ``tests/test_triton_groupnorm.py`` checks the two
agree (on CPU through Triton's interpreter, ``TRITON_INTERPRET=1``, and on CUDA when present).

Triton is imported lazily, on the first kernel call, so ``import medgen`` works without it.

Kernels work on the channels-first contiguous layout viewed as ``(B, C, S)``: the elements of one
group are then one contiguous run of ``(C // G) * S`` values, and those of one (b, c) pair a run of
``S`` values. Per-(b, c) affine terms are folded in PyTorch into two float32 vectors so that
``z = xhat * P[b, c] + Q[b, c]`` with ``P = weight * (1 + scale)`` and
``Q = bias * (1 + scale) + shift``; these (B, C)-sized ops are negligible next to the kernels.
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = ["available", "group_norm_act_backward", "group_norm_act_forward"]

_ACTS = ("silu", "identity")
_BLOCK = 1024  # elements per block in every kernel; fixed (no autotuning)
_NUM_WARPS = 4
# Reductions split long rows so that at least about this many programs run (an H100/H200 has
# 132 SMs); partial results are combined in PyTorch.
_TARGET_PROGRAMS = 1024


def available() -> bool:
    """True when Triton can be imported (the kernels additionally need CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels() -> SimpleNamespace:
    """Build the Triton kernels (imports triton; cached)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_kernel(x_ptr, part_ptr, N, CHUNK, NSPLIT, BLOCK: tl.constexpr):
        # One program per (group row, split): a row is the N = (C // G) * S contiguous values of
        # one (b, g); a split is CHUNK of them. Each block's mean and centred sum of squares are
        # merged into the running (count, mean, M2) with Chan's update -- single pass, and every
        # square is taken about a nearby mean, so no sum/sum-of-squares cancellation.
        pid = tl.program_id(0)
        row = pid // NSPLIT
        split = pid % NSPLIT
        base = x_ptr + row.to(tl.int64) * N
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, N)
        offs = tl.arange(0, BLOCK)
        count = tl.zeros((), dtype=tl.float32)
        mean = tl.zeros((), dtype=tl.float32)
        m2 = tl.zeros((), dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            mask = idx < hi
            v = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            nb = tl.minimum(hi - start, BLOCK).to(tl.float32)
            mb = tl.sum(v, axis=0) / nb
            d = tl.where(mask, v - mb, 0.0)
            m2b = tl.sum(d * d, axis=0)
            total = count + nb
            delta = mb - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta * delta * (count * (nb / total))
            count = total
        out = part_ptr + pid.to(tl.int64) * 3
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def _apply_kernel(
        x_ptr,
        out_ptr,
        mean_ptr,
        rstd_ptr,
        p_ptr,
        q_ptr,
        C,
        S,
        CPG,
        G,
        NBLK,
        ACT_SILU: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per (b, c, block of S).
        pid = tl.program_id(0)
        bc = pid // NBLK
        blk = pid % NBLK
        b = bc // C
        c = bc % C
        bg = b * G + c // CPG
        mean = tl.load(mean_ptr + bg)
        rstd = tl.load(rstd_ptr + bg)
        p = tl.load(p_ptr + bc)
        q = tl.load(q_ptr + bc)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        mask = idx < S
        offs = bc.to(tl.int64) * S + idx
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * rstd * p + q
        if ACT_SILU:
            z = z * tl.sigmoid(z)
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_reduce_kernel(
        x_ptr,
        dout_ptr,
        part_ptr,
        mean_ptr,
        rstd_ptr,
        p_ptr,
        q_ptr,
        C,
        S,
        CPG,
        G,
        CHUNK,
        NSPLIT,
        ACT_SILU: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per ((b, c), split): partial sums over S of gz and gz * xhat, where
        # gz = dout * act'(z) is the gradient with respect to z. Every other per-channel sum the
        # backward needs is an affine combination of these two (see _backward).
        pid = tl.program_id(0)
        bc = pid // NSPLIT
        split = pid % NSPLIT
        b = bc // C
        c = bc % C
        bg = b * G + c // CPG
        mean = tl.load(mean_ptr + bg)
        rstd = tl.load(rstd_ptr + bg)
        p = tl.load(p_ptr + bc)
        q = tl.load(q_ptr + bc)
        base = bc.to(tl.int64) * S
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, S)
        offs = tl.arange(0, BLOCK)
        acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_gx = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            mask = idx < hi
            x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            gz = tl.load(dout_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            if ACT_SILU:
                z = xhat * p + q
                sig = tl.sigmoid(z)
                gz = gz * (sig * (1.0 + z * (1.0 - sig)))
            gz = tl.where(mask, gz, 0.0)
            acc_g += gz
            acc_gx += gz * tl.where(mask, xhat, 0.0)
        out = part_ptr + pid.to(tl.int64) * 2
        tl.store(out, tl.sum(acc_g, axis=0))
        tl.store(out + 1, tl.sum(acc_gx, axis=0))

    @triton.jit
    def _bwd_dx_kernel(
        x_ptr,
        dout_ptr,
        dx_ptr,
        mean_ptr,
        rstd_ptr,
        p_ptr,
        q_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        C,
        S,
        CPG,
        G,
        NBLK,
        ACT_SILU: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per (b, c, block of S): dx = A * gz - Bc - xhat * Cc, with A, Bc, Cc the
        # per-(b, c) coefficients of the GroupNorm backward (see _backward).
        pid = tl.program_id(0)
        bc = pid // NBLK
        blk = pid % NBLK
        b = bc // C
        c = bc % C
        bg = b * G + c // CPG
        mean = tl.load(mean_ptr + bg)
        rstd = tl.load(rstd_ptr + bg)
        ca = tl.load(a_ptr + bc)
        cb = tl.load(b_ptr + bc)
        cc = tl.load(c_ptr + bc)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        mask = idx < S
        offs = bc.to(tl.int64) * S + idx
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gz = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if ACT_SILU:
            p = tl.load(p_ptr + bc)
            q = tl.load(q_ptr + bc)
            z = xhat * p + q
            sig = tl.sigmoid(z)
            gz = gz * (sig * (1.0 + z * (1.0 - sig)))
        dx = ca * gz - cb - xhat * cc
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(
        stats=_stats_kernel,
        apply=_apply_kernel,
        bwd_reduce=_bwd_reduce_kernel,
        bwd_dx=_bwd_dx_kernel,
    )


# --------------------------------------------------------------------------------------------
# helpers (PyTorch, on (B, C)- and (B, G)-sized tensors only)
# --------------------------------------------------------------------------------------------


def _check(x: Tensor, num_groups: int, act: str) -> tuple[int, int, int]:
    if act not in _ACTS:
        raise ValueError(f"act must be one of {_ACTS}, got {act!r}")
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (B, C, *spatial), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {x.dtype}; use float32, float16 or bfloat16")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on"):
        raise ValueError(
            "the Triton GroupNorm kernels need CUDA tensors (or CPU tensors with "
            "TRITON_INTERPRET=1); use the PyTorch reference path on this device"
        )
    b, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the channel count {c}")
    s = math.prod(x.shape[2:])
    if c == 0 or s == 0:
        raise ValueError(f"empty channel or spatial dimension in input of shape {tuple(x.shape)}")
    return b, c, s


def _per_channel(t: Tensor | None, name: str, c: int) -> Tensor | None:
    if t is None:
        return None
    if t.numel() != c:
        raise ValueError(f"{name} must have {c} elements, got shape {tuple(t.shape)}")
    return t.reshape(c).float()


def _per_sample(t: Tensor | None, name: str, b: int, c: int) -> Tensor | None:
    if t is None:
        return None
    if t.numel() != b * c:
        raise ValueError(f"{name} must have shape ({b}, {c}), got {tuple(t.shape)}")
    return t.reshape(b, c).float()


def _fold(w, bias, scale, shift, b: int, c: int, device) -> tuple[Tensor, Tensor]:
    """P, Q (float32, (B, C)) with z = xhat * P + Q."""
    p = torch.ones(b, c, device=device, dtype=torch.float32)
    q = torch.zeros(b, c, device=device, dtype=torch.float32)
    if w is not None:
        p = p * w
    if bias is not None:
        q = q + bias
    if scale is not None:
        p = p * (1.0 + scale)
        q = q * (1.0 + scale)
    if shift is not None:
        q = q + shift
    return p.contiguous(), q.contiguous()


def _splits(rows: int, length: int) -> tuple[int, int]:
    """(chunk, nsplit) so that rows * nsplit programs cover ``length`` values per row."""
    nblk = _cdiv(length, _BLOCK)
    nsplit = max(1, min(nblk, _cdiv(_TARGET_PROGRAMS, max(rows, 1))))
    chunk = _cdiv(_cdiv(length, nsplit), _BLOCK) * _BLOCK
    return chunk, _cdiv(length, chunk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def group_norm_act_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    act: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused GroupNorm(+affine) -> ``* (1 + scale) + shift`` -> activation.

    Args:
        x: (B, C, *spatial), float32/float16/bfloat16, on CUDA (or CPU under TRITON_INTERPRET=1).
        weight, bias: (C,) GroupNorm affine parameters, or None (1 / 0).
        scale, shift: (B, C) per-sample modulation, or None (0 / 0).
        num_groups: G, dividing C.
        eps: added to the (biased) variance.
        act: "silu" or "identity".

    Returns:
        (out, mean, rstd): ``out`` channels-first contiguous in ``x.dtype``; ``mean`` and ``rstd``
        float32 of shape (B, G), to be handed to :func:`group_norm_act_backward`.
    """
    b, c, s = _check(x, num_groups, act)
    g = num_groups
    if b == 0:
        empty = x.new_empty((0, g), dtype=torch.float32)
        return torch.empty_like(x, memory_format=torch.contiguous_format), empty, empty.clone()
    k = _kernels()
    x = x.contiguous()
    w = _per_channel(weight, "weight", c)
    bb = _per_channel(bias, "bias", c)
    sc = _per_sample(scale, "scale", b, c)
    sh = _per_sample(shift, "shift", b, c)

    n = (c // g) * s
    rows = b * g
    chunk, nsplit = _splits(rows, n)
    part = torch.empty(rows * nsplit * 3, device=x.device, dtype=torch.float32)
    k.stats[(rows * nsplit,)](x, part, n, chunk, nsplit, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    cnt, pmean, pm2 = part.view(rows, nsplit, 3).unbind(-1)
    if nsplit == 1:
        mean = pmean[:, 0]
        m2 = pm2[:, 0]
    else:  # Chan's merge of the splits
        mean = (cnt * pmean).sum(1) / n
        m2 = pm2.sum(1) + (cnt * (pmean - mean[:, None]) ** 2).sum(1)
    rstd = torch.rsqrt(m2 / n + eps)
    mean = mean.contiguous()

    p, q = _fold(w, bb, sc, sh, b, c, x.device)
    out = torch.empty_like(x)
    nblk = _cdiv(s, _BLOCK)
    k.apply[(b * c * nblk,)](
        x,
        out,
        mean,
        rstd,
        p,
        q,
        c,
        s,
        c // g,
        g,
        nblk,
        ACT_SILU=act == "silu",
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out, mean.view(b, g), rstd.view(b, g)


def group_norm_act_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    act: str,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Backward of :func:`group_norm_act_forward`, recomputing ``xhat`` and ``z`` from
    ``x``, ``mean`` and ``rstd`` (nothing else needs saving).

    Returns:
        (dx, dweight, dbias, dscale, dshift): ``dx`` channels-first contiguous in ``x.dtype``;
        the others shaped and typed like their parameters (``dweight``/``dbias`` (C,),
        ``dscale``/``dshift`` (B, C)), or None where the parameter is None.
    """
    b, c, s = _check(x, num_groups, act)
    g = num_groups
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}")
    w = _per_channel(weight, "weight", c)
    bb = _per_channel(bias, "bias", c)
    sc = _per_sample(scale, "scale", b, c)
    sh = _per_sample(shift, "shift", b, c)
    if b == 0:
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        return (
            dx,
            None if weight is None else torch.zeros_like(weight),
            None if bias is None else torch.zeros_like(bias),
            None if scale is None else torch.zeros_like(scale),
            None if shift is None else torch.zeros_like(shift),
        )
    k = _kernels()
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    mean = mean.reshape(b * g).float().contiguous()
    rstd = rstd.reshape(b * g).float().contiguous()
    p, q = _fold(w, bb, sc, sh, b, c, x.device)
    silu = act == "silu"

    # Per-(b, c) sums over space of gz (gradient w.r.t. z) and gz * xhat.
    rows = b * c
    chunk, nsplit = _splits(rows, s)
    part = torch.empty(rows * nsplit * 2, device=x.device, dtype=torch.float32)
    k.bwd_reduce[(rows * nsplit,)](
        x,
        grad_out,
        part,
        mean,
        rstd,
        p,
        q,
        c,
        s,
        c // g,
        g,
        chunk,
        nsplit,
        ACT_SILU=silu,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    sums = part.view(b, c, nsplit, 2).sum(2)
    s_g, s_gx = sums[..., 0], sums[..., 1]  # (B, C)

    # With dy = gz * (1 + scale) the gradient w.r.t. y, and dxhat = dy * weight:
    #   dshift = sum gz;  dscale = sum gz * y = weight * sum gz*xhat + bias * sum gz
    #   dweight = sum_b sum dy * xhat;  dbias = sum_b sum dy
    #   dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
    one_sc = 1.0 + sc if sc is not None else torch.ones_like(s_g)
    s_dy = one_sc * s_g
    s_dyx = one_sc * s_gx
    wc = w if w is not None else torch.ones(c, device=x.device, dtype=torch.float32)
    n = (c // g) * s
    m1 = (wc * s_dy).view(b, g, c // g).sum(-1) / n  # mean_g(dxhat), (B, G)
    m2 = (wc * s_dyx).view(b, g, c // g).sum(-1) / n  # mean_g(dxhat * xhat)
    r = rstd.view(b, g)
    coef_a = (r.repeat_interleave(c // g, dim=1) * wc * one_sc).contiguous()
    coef_b = (r * m1).repeat_interleave(c // g, dim=1).contiguous()
    coef_c = (r * m2).repeat_interleave(c // g, dim=1).contiguous()

    dx = torch.empty_like(x)
    nblk = _cdiv(s, _BLOCK)
    k.bwd_dx[(b * c * nblk,)](
        x,
        grad_out,
        dx,
        mean,
        rstd,
        p,
        q,
        coef_a,
        coef_b,
        coef_c,
        c,
        s,
        c // g,
        g,
        nblk,
        ACT_SILU=silu,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )

    dweight = None if weight is None else s_dyx.sum(0).to(weight.dtype).reshape(weight.shape)
    dbias = None if bias is None else s_dy.sum(0).to(bias.dtype).reshape(bias.shape)
    dscale = None
    if scale is not None:
        ds = wc * s_gx
        if bb is not None:
            ds = ds + bb * s_g
        dscale = ds.to(scale.dtype).reshape(scale.shape)
    dshift = None if shift is None else s_g.to(shift.dtype).reshape(shift.shape)
    return dx, dweight, dbias, dscale, dshift
