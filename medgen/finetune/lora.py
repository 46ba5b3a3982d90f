"""Low-rank adapters (LoRA) on the weights of convolutions and linear layers, 1D/2D/3D.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, eq. 3) keeps a
pre-trained weight ``W`` frozen and trains a low-rank update: ``W' = W + (alpha / r) * B @ A`` with
``A`` of shape ``(r, fan_in)`` (Kaiming-uniform initialised) and ``B`` of shape ``(fan_out, r)``
(zeros), so training starts from the pre-trained function exactly. For a convolution with weight
``(C_out, C_in, *kernel)`` the update is ``(B @ A).view(C_out, C_in, *kernel)``; this is the same
update peft's ``lora.Conv2d``/``lora.Conv3d`` compute (a ``C_in -> r`` convolution with the kernel,
then a ``1x1`` ``r -> C_out``), which a test checks output for output.

Why our own layers instead of peft's wrappers: medgen's self-attention
(:class:`medgen.nn.attention.SelfAttention`) reads the weights of its ``qkv``/``proj_out`` 1x1
convolutions directly (``F.linear`` on tokens, for the fused attention kernels) instead of calling
the modules, and peft's wrappers only act when the wrapped module is *called*: with peft 0.21 an
adapter on those projections is silently ignored, and its parameter-level LoRA refuses 4D weights.
Here an adapted layer becomes a :class:`LoRALinear`/:class:`LoRAConv2d`/... (the same layer with
``weight_base``, ``lora_A``, ``lora_B``), whose ``weight`` *is* ``W + dW``, however the parent uses
it; the classes are importable, so adapted models pickle (``ddp_spawn``) and deep-copy. Merging
(:func:`merge_lora`) writes ``W + dW`` into the layer and gives it back its plain class;
:func:`merged_adapters` exports merged weights and restores the exact training state.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "LORA_TYPES",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRALayer",
    "LoRALinear",
    "add_lora",
    "has_lora",
    "lora_config",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged_adapters",
]

#: Layer types that take an adapter (their ``weight`` is ``(out, in, *kernel)``).
LORA_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRALayer:
    """Mixin of an adapted layer: ``weight = weight_base + (alpha / r) * (B @ A).view_as(W)``.

    Attributes:
        weight_base: The frozen pre-trained weight ``W``.
        lora_A: ``(r, C_in * prod(kernel))``, Kaiming-uniform initialised.
        lora_B: ``(C_out, r)``, zeros.
        lora_r: The rank ``r``; ``lora_alpha``: the scale numerator.
    """

    @property
    def weight(self) -> torch.Tensor:
        base = self.weight_base
        delta = (self.lora_B @ self.lora_A) * (self.lora_alpha / self.lora_r)
        return base + delta.view_as(base).to(base.dtype)


class LoRALinear(LoRALayer, nn.Linear):
    """An adapted :class:`torch.nn.Linear`."""


class LoRAConv1d(LoRALayer, nn.Conv1d):
    """An adapted :class:`torch.nn.Conv1d`."""


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """An adapted :class:`torch.nn.Conv2d`."""


class LoRAConv3d(LoRALayer, nn.Conv3d):
    """An adapted :class:`torch.nn.Conv3d`."""


_ADAPTED = {
    nn.Linear: LoRALinear,
    nn.Conv1d: LoRAConv1d,
    nn.Conv2d: LoRAConv2d,
    nn.Conv3d: LoRAConv3d,
}
_PLAIN = {v: k for k, v in _ADAPTED.items()}


def _attach(
    module: nn.Module,
    r: int,
    alpha: float,
    tensors: tuple[nn.Parameter, nn.Parameter] | None = None,
) -> None:
    """Turn a plain layer into its adapted class (new ``A``/``B``, or the given ones)."""
    if int(r) < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
    base = module._parameters.pop("weight")
    module.__class__ = _ADAPTED[type(module)]
    module.register_parameter("weight_base", base)
    if tensors is None:
        factory = {"dtype": base.dtype, "device": base.device}
        lora_a = nn.Parameter(torch.empty(int(r), base[0].numel(), **factory))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) do
        tensors = (lora_a, nn.Parameter(torch.zeros(base.shape[0], int(r), **factory)))
    module.lora_A, module.lora_B = tensors
    module.lora_r, module.lora_alpha = int(r), float(alpha)


def _detach(module: nn.Module, weight: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """Give an adapted layer its plain class back, with ``weight`` in its base parameter."""
    base = module._parameters.pop("weight_base")
    lora = (module._parameters.pop("lora_A"), module._parameters.pop("lora_B"))
    with torch.no_grad():
        base.copy_(weight)
    module.__class__ = _PLAIN[type(module)]
    module.register_parameter("weight", base)
    del module.lora_r, module.lora_alpha
    return lora


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that carry an adapter, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def has_lora(model: nn.Module) -> bool:
    """Whether any layer of ``model`` carries an adapter."""
    return any(isinstance(m, LoRALayer) for m in model.modules())


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    target: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    freeze_base: bool = True,
) -> list[str]:
    """Add a LoRA adapter to the convolutions and linear layers of ``model`` named by ``target``.

    Args:
        model: The net (or a LightningModule: names are then e.g. ``net.down.0.conv``).
        r: Rank of the updates.
        alpha: Scale numerator (default ``r``: scale 1); the update is ``alpha / r * B @ A``.
        target: Glob patterns over module names (``fnmatch``; ``*`` crosses dots); only
            :data:`LORA_TYPES` among the matches get adapters.
        exclude: Glob patterns of module names to leave alone.
        freeze_base: Freeze every parameter of ``model`` except the adapters (LoRA's setting).

    Returns:
        The names of the adapted layers.

    Raises:
        ValueError: a ``target`` pattern matches no adaptable layer (the message lists a few
            names), or a layer already has an adapter.
    """
    alpha = float(r if alpha is None else alpha)
    candidates = {
        name: m
        for name, m in model.named_modules()
        if (type(m) in _ADAPTED or isinstance(m, LoRALayer))
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    chosen: dict[str, nn.Module] = {}
    for pattern in target:
        hits = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            examples = ", ".join(list(candidates)[:6]) or "none"
            raise ValueError(
                f"LoRA target {pattern!r} matches no convolution or linear layer of "
                f"{type(model).__name__} (layers are named like: {examples})"
            )
        chosen.update(hits)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in chosen.items():
        if isinstance(module, LoRALayer):
            raise ValueError(f"layer {name!r} already has a LoRA adapter")
        _attach(module, r, alpha)
    return list(chosen)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` only (``<layer>.lora_A``, ``<layer>.lora_B``)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.endswith((".lora_A", ".lora_B"))
    }


def lora_config(model: nn.Module) -> dict[str, Any]:
    """``{"targets": [names], "r": r, "alpha": alpha}`` describing the adapters of ``model``."""
    layers = lora_modules(model)
    if not layers:
        return {}
    first = next(iter(layers.values()))
    return {"targets": list(layers), "r": first.lora_r, "alpha": first.lora_alpha}


def merge_lora(model: nn.Module) -> list[str]:
    """Write ``W + dW`` into every adapted layer and remove the adapters (in place).

    Returns:
        The names of the merged layers; ``model`` then has its original state-dict keys.
    """
    names = []
    for name, module in lora_modules(model).items():
        _detach(module, module.weight.detach())
        names.append(name)
    return names


@contextlib.contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model``'s adapters are merged; on exit the adapters come back exactly.

    Used to export a LoRA-tuned model as plain weights (``save_pretrained``): inside, the state
    dict has the original keys with merged weights; afterwards training can continue, with the
    same parameter objects (the optimiser's), the frozen base weights and the adapters bit for bit
    as before. A no-op without adapters.
    """
    layers = lora_modules(model)
    saved = {}
    for name, module in layers.items():
        original = module.weight_base.detach().clone()
        rank_alpha = (module.lora_r, module.lora_alpha)
        saved[name] = (original, rank_alpha, _detach(module, module.weight.detach()))
    try:
        yield model
    finally:
        for name, module in layers.items():
            original, (r, alpha), tensors = saved[name]
            with torch.no_grad():
                module.weight.copy_(original)
            _attach(module, r, alpha, tensors)


def apply_lora_state(
    model: nn.Module,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor] | None,
    source: str,
) -> None:
    """Add the adapters described by ``config`` (:func:`lora_config`) and load their ``state``.

    With ``state=None`` the adapters are added only (their tensors come with a checkpoint).

    Raises:
        ValueError: naming ``source`` when a layer is missing or a tensor does not fit.
    """
    modules = dict(model.named_modules())
    targets = list(config.get("targets", ()))
    missing = [t for t in targets if t not in modules or type(modules[t]) not in _ADAPTED]
    if missing:
        raise ValueError(
            f"'{source}': the adapter's layer {missing[0]!r} is not a convolution or linear layer "
            "of the base model"
        )
    for name in targets:
        _attach(modules[name], int(config["r"]), float(config["alpha"]))
    if state is None:
        return
    expected = lora_state_dict(model)
    if set(expected) != set(state):
        extra = sorted(set(state) ^ set(expected))
        raise ValueError(f"'{source}': adapter tensors do not match the layers, e.g. {extra[0]!r}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"'{source}': adapter tensor {key!r} has shape {tuple(value.shape)}, the layer "
                f"needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(dict(state), strict=False)
