"""Memory-lean GroupNorm + scale-shift + SiLU, fused on the GPU (Triton) and on the CPU (reference).

Every residual block of a diffusion UNet or autoencoder runs ``GroupNorm → [scale-shift] → SiLU →
conv``. Composed from separate PyTorch ops, autograd keeps the norm's input, the norm's output (for
the scale's gradient and for SiLU), the scale-shift output (for SiLU) and the SiLU output (for the
conv): up to four full-size tensors per pair. :func:`group_norm_act` keeps only the input and the
per-group statistics ``(B, G)`` and recomputes the rest in the backward pass, so the pair costs one
tensor (plus the conv's own input). The recomputation is elementwise and cheap next to the
convolutions.

Two implementations sit behind one :class:`torch.autograd.Function`:

* the **reference** path (any device; what CPU runs) calls ATen's ``native_group_norm`` and
  ``native_group_norm_backward`` on channels-first data and does the scale-shift and SiLU in place;
* the **Triton** path (CUDA tensors, when Triton is installed) runs the kernels of
  :mod:`medgen.nn.triton_groupnorm`, which fuse the statistics, normalisation, scale-shift and
  activation into two kernels forward and three backward.

Both accept channels-last inputs and return outputs in the input's memory format. GroupNorm
backward in ATen is slow on channels-last CPU tensors, so the reference path converts to
channels-first for the reductions and back, which is faster than the native channels-last kernel.

References:
    Wu & He, "Group Normalization", ECCV 2018 (eq. 1–2).
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021 (AdaGN, sec. 3).
    Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016 (recomputation).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import memory_format_of

__all__ = [
    "ACTIVATIONS",
    "GroupNormAct",
    "fused_backend",
    "group_norm_act",
    "norm_act",
    "set_fused_backend",
]

ACTIVATIONS = ("silu", "identity")
_BACKENDS = ("auto", "reference", "triton")
_backend = os.environ.get("MEDGEN_FUSED_BACKEND", "auto")


def set_fused_backend(backend: str) -> None:
    """Choose the implementation of :func:`group_norm_act` for CUDA tensors.

    Args:
        backend: ``"auto"`` (Triton on CUDA when installed, else the reference), ``"reference"``
            (always ATen) or ``"triton"`` (Triton on CUDA; CPU tensors still use the reference).
            The environment variable ``MEDGEN_FUSED_BACKEND`` sets the default.
    """
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"Unknown fused backend {backend!r}; valid backends are {_BACKENDS}.")
    _backend = backend


def fused_backend(x: Tensor) -> str:
    """Return the implementation :func:`group_norm_act` uses for ``x``: "triton" or "reference"."""
    if _backend == "reference" or not x.is_cuda:
        return "reference"
    from medgen.nn import triton_groupnorm

    if triton_groupnorm.available():
        return "triton"
    if _backend == "triton":
        raise RuntimeError("MEDGEN_FUSED_BACKEND=triton but Triton is not installed.")
    return "reference"


def _bcast(v: Tensor | None, x: Tensor) -> Tensor | None:
    """``(B, C)`` → ``(B, C, 1, ..., 1)`` (or ``(C,)`` → ``(C, 1, ..., 1)``) in ``x``'s dtype."""
    if v is None:
        return None
    return v.to(x.dtype).reshape(v.shape + (1,) * (x.dim() - 2))


def _per_channel(stat: Tensor, channels: int) -> Tensor:
    """``(B, G)`` group statistics → ``(B, C)``, each group's value repeated for its channels."""
    return stat.repeat_interleave(channels // stat.shape[1], dim=1)


def _spatial(v: Tensor, x: Tensor) -> Tensor:
    """``(B, C)`` → ``(B, C, 1, ..., 1)`` to broadcast over the spatial dims of ``x``."""
    return v.reshape(v.shape + (1,) * (x.dim() - 2))


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum over spatial of a * b`` per ``(B, C)``, in float32 or wider."""
    acc = torch.promote_types(a.dtype, torch.float32)
    if a.is_contiguous() and b.is_contiguous():
        bc = a.shape[0] * a.shape[1]
        return torch.bmm(a.reshape(bc, 1, -1).to(acc), b.reshape(bc, -1, 1).to(acc)).reshape(
            a.shape[:2]
        )
    return (a * b).sum(tuple(range(2, a.dim())), dtype=acc)


def _affine_coefficients(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-``(B, C)`` coefficients, in float32 or wider, so that the op is affine in ``x``.

    With ``a = rstd * w`` and ``c = b - mean * a``, the norm is ``y = a x + c``, and with
    ``k = 1 + scale`` the pre-activation is ``z = (a k) x + (c k + shift)``.

    Returns:
        ``(mean_c, rstd_c, a, c, k, ...)`` as ``(mean_c, rstd_c, a, c, k, shift)`` per channel.
    """
    b, ch = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    mean_c = _per_channel(mean.to(acc), ch)
    rstd_c = _per_channel(rstd.to(acc), ch)
    w = torch.ones(ch, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    a = rstd_c * w
    c = -mean_c * a if bias is None else bias.to(acc) - mean_c * a
    k = torch.ones(b, ch, dtype=acc, device=x.device) if scale is None else 1 + scale.to(acc)
    sh = torch.zeros(b, ch, dtype=acc, device=x.device) if shift is None else shift.to(acc)
    return mean_c, rstd_c, a, c, k.reshape(b, ch), sh.reshape(b, ch)


def _reference_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    act: str,
) -> tuple[Tensor, Tensor, Tensor]:
    b, ch = x.shape[:2]
    w = None if weight is None else weight.to(x.dtype)
    bi = None if bias is None else bias.to(x.dtype)
    # ATen's CPU kernel handles channels-last input directly; only the statistics are kept.
    out, mean, rstd = torch.ops.aten.native_group_norm(
        x, w, bi, b, ch, x.numel() // max(b * ch, 1), num_groups, eps
    )
    if scale is not None:
        out.mul_(_spatial(1 + scale.to(x.dtype).reshape(b, ch), x))
    if shift is not None:
        out.add_(_spatial(shift.to(x.dtype).reshape(b, ch), x))
    if act == "silu":
        out = F.silu(out, inplace=True)
    return out, mean, rstd


def _reference_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    act: str,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients from ``x`` and the statistics alone, in a few layout-agnostic passes.

    The op is affine in ``x`` per ``(b, c)`` up to the activation, so everything reduces to two
    per-channel sums of ``g = dL/dz``: ``S1 = sum g`` and ``S2 = sum g x`` (Wu & He 2018, eq. 1
    differentiated). Full-size passes: ``z`` (one), ``silu'`` (one), ``S1``/``S2`` (two) and
    ``dx = P g + Q x + R`` (two); nothing is copied between memory formats.
    """
    b, ch = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    n = x.numel() // max(b * ch, 1) * (ch // num_groups)  # elements per group
    mean_c, rstd_c, a, c, k, sh = _affine_coefficients(x, weight, bias, scale, shift, mean, rstd)
    if act == "silu":
        z = torch.addcmul(
            _spatial((c * k + sh).to(x.dtype), x), x, _spatial((a * k).to(x.dtype), x)
        )
        g = torch.ops.aten.silu_backward(grad, z)
        del z
    else:
        g = grad
    acc = a.dtype
    s1 = g.sum(spatial, dtype=acc)
    s2 = _channel_dot(g, x)
    # sum over spatial of g * xhat, with xhat = (x - mean) * rstd.
    s_xhat = rstd_c * (s2 - mean_c * s1)
    dshift = s1 if shift is not None else None
    # dz/dscale = y = xhat * w + bias.
    w = torch.ones(ch, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    dscale = s_xhat * w + (0 if bias is None else bias.to(acc)) * s1 if scale is not None else None
    dw = (k * s_xhat).sum(0) if weight is not None and needs[1] else None
    db = (k * s1).sum(0) if bias is not None and needs[2] else None
    dx = None
    if needs[0]:
        # dxhat = g * k * w; per group: m1 = mean(dxhat), m2 = mean(dxhat * xhat).
        kw = k * w
        m1 = (kw * s1).reshape(b, num_groups, -1).sum(-1) / n
        m2 = (kw * s_xhat).reshape(b, num_groups, -1).sum(-1) / n
        m1, m2 = _per_channel(m1, ch), _per_channel(m2, ch)
        # dx = rstd * (dxhat - m1 - xhat * m2) = P g + Q x + R.
        p_ = rstd_c * kw
        q_ = -rstd_c * rstd_c * m2
        r_ = rstd_c * (rstd_c * m2 * mean_c - m1)
        dx = torch.addcmul(_spatial(r_.to(x.dtype), x), g, _spatial(p_.to(x.dtype), x))
        dx.addcmul_(x, _spatial(q_.to(x.dtype), x))
    return dx, dw, db, dscale, dshift


class _GroupNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        scale: Tensor | None,
        shift: Tensor | None,
        num_groups: int,
        eps: float,
        act: str,
    ) -> Tensor:
        fmt = memory_format_of(x)
        if fused_backend(x) == "triton":
            from medgen.nn import triton_groupnorm

            out, mean, rstd = triton_groupnorm.group_norm_act_forward(
                x.contiguous(), weight, bias, scale, shift, num_groups, eps, act
            )
        else:
            out, mean, rstd = _reference_forward(
                x, weight, bias, scale, shift, num_groups, eps, act
            )
        # Keep the caller's tensor (not the channels-first copy) so no extra memory is held.
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups = num_groups
        ctx.act = act
        return out.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        fmt = memory_format_of(x)
        if fused_backend(x) == "triton":
            from medgen.nn import triton_groupnorm

            dx, dw, db, dscale, dshift = triton_groupnorm.group_norm_act_backward(
                grad.contiguous(), x.contiguous(), weight, bias, scale, shift, mean, rstd,
                ctx.num_groups, ctx.act,
            )  # fmt: skip
        else:
            # The reference passes are elementwise with per-channel coefficients, so they run in
            # the caller's memory format; the gradient is brought to x's layout first.
            dx, dw, db, dscale, dshift = _reference_backward(
                grad.contiguous(memory_format=fmt), x, weight, bias, scale, shift, mean, rstd,
                ctx.num_groups, ctx.act, ctx.needs_input_grad[:5],
            )  # fmt: skip
        if dx is not None:
            dx = dx.contiguous(memory_format=fmt)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dw if needs[1] else None,
            db if needs[2] else None,
            dscale if needs[3] else None,
            dshift if needs[4] else None,
            None,
            None,
            None,
        )


def group_norm_act(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    act: str = "silu",
) -> Tensor:
    """``act(GroupNorm(x) * (1 + scale) + shift)`` keeping only ``x`` and the statistics for backward.

    Args:
        x: Input of shape ``(B, C, *spatial)``, any float dtype, contiguous or channels-last.
        num_groups: Number of groups ``G``; must divide ``C``.
        weight: Per-channel scale ``(C,)`` of the norm, or ``None``.
        bias: Per-channel shift ``(C,)`` of the norm, or ``None``.
        eps: Added to the variance.
        scale: Per-sample, per-channel scale ``(B, C)`` (AdaGN), applied as ``1 + scale``, or ``None``.
        shift: Per-sample, per-channel shift ``(B, C)``, or ``None``.
        act: ``"silu"`` or ``"identity"``.

    Returns:
        Tensor of the shape, dtype and memory format of ``x``.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {act!r}; valid activations are {ACTIVATIONS}.")
    if x.dim() < 3 or x.shape[1] % num_groups:
        raise ValueError(
            f"group_norm_act needs (B, C, *spatial) with C divisible by num_groups={num_groups}, "
            f"got shape {tuple(x.shape)}."
        )
    if not torch.is_grad_enabled() or not (
        x.requires_grad
        or any(t is not None and t.requires_grad for t in (weight, bias, scale, shift))
    ):
        # Inference: no tensors to save, so run the forward directly (Triton on CUDA).
        with torch.no_grad():
            return _GroupNormActFunction.forward(
                _NoCtx(), x, weight, bias, scale, shift, num_groups, eps, act
            )
    return _GroupNormActFunction.apply(x, weight, bias, scale, shift, num_groups, eps, act)


class _NoCtx:
    """Stand-in for the autograd context when no graph is recorded."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


class GroupNormAct(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` followed by an activation, through :func:`group_norm_act`.

    Has the parameters and state-dict keys of ``nn.GroupNorm`` (``weight``, ``bias``), so it can
    replace a ``GroupNorm`` + ``SiLU`` pair in a checkpoint unchanged.

    Args:
        num_groups: Number of groups ``G``.
        num_channels: Channels ``C`` (divisible by ``G``).
        eps: Added to the variance.
        affine: Learn a per-channel weight and bias.
        act: ``"silu"`` or ``"identity"``.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *spatial)``; ``scale`` and ``shift`` in ``forward`` are
        ``(B, C)``.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        act: str = "silu",
    ) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        if act not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {act!r}; valid activations are {ACTIVATIONS}.")
        self.act = act

    def forward(
        self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None
    ) -> Tensor:
        """Normalise ``x``, apply ``(1 + scale)`` and ``shift`` if given, then the activation."""
        return group_norm_act(
            x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, self.act
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


def norm_act(
    norm: nn.Module,
    act: nn.Module,
    x: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor:
    """``act(norm(x) * (1 + scale) + shift)``, fused when ``norm`` is a GroupNorm and ``act`` SiLU.

    The fused path (:func:`group_norm_act`) is taken for a plain :class:`torch.nn.GroupNorm`
    followed by :class:`torch.nn.SiLU` or :class:`torch.nn.Identity`; any other pair runs as
    composed modules, so blocks built with other norms or activations behave as written.

    Args:
        norm: The normalisation module.
        act: The activation module.
        x: Input ``(B, C, *spatial)``.
        scale: Optional ``(B, C)`` scale, applied as ``1 + scale`` after the norm.
        shift: Optional ``(B, C)`` shift, added after the scale.

    Returns:
        Tensor of the shape of ``x``.
    """
    if type(norm) is nn.GroupNorm and type(act) in (nn.SiLU, nn.Identity):
        return group_norm_act(
            x,
            norm.num_groups,
            norm.weight,
            norm.bias,
            norm.eps,
            scale,
            shift,
            "silu" if type(act) is nn.SiLU else "identity",
        )
    h = norm(x)
    if scale is not None:
        h = h * (1 + _bcast(scale, h))
    if shift is not None:
        h = h + _bcast(shift, h)
    if type(act) is nn.SiLU and not torch.is_grad_enabled() and h is not x:
        # Inference (e.g. tiled decoding with whole-volume statistics, which swaps the norm):
        # ``h`` is a fresh tensor, so activate it in place instead of allocating another one.
        return F.silu(h, inplace=True)
    return act(h)
