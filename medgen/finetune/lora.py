"""Low-rank adapters (LoRA) on the weights of convolutions and linear layers, 1D/2D/3D.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, eq. 3) keeps a
pre-trained weight ``W`` frozen and trains a low-rank update: ``W' = W + (alpha / r) * B @ A`` with
``A`` of shape ``(r, fan_in)`` (Kaiming-uniform initialised) and ``B`` of shape ``(fan_out, r)``
(zeros), so training starts from the pre-trained function exactly. For a convolution with weight
``(C_out, C_in, *kernel)`` the update is ``(B @ A).view(C_out, C_in, *kernel)``; this is the same
update peft's ``lora.Conv2d``/``lora.Conv3d`` compute (a ``C_in -> r`` convolution with the kernel,
then a ``1x1`` ``r -> C_out``), which a test checks output for output.

Why our own module instead of peft's layer wrappers: medgen's self-attention
(:class:`medgen.nn.attention.SelfAttention`) reads the weights of its ``qkv``/``proj_out`` 1x1
convolutions directly (``F.linear`` on tokens, for the fused attention kernels) instead of calling
the modules, and peft's wrappers only act when the wrapped module is *called*: with peft 0.21 an
adapter on those projections is silently ignored, and its parameter-level LoRA refuses 4D weights.
Here the adapter is a ``torch.nn.utils.parametrize`` parametrisation of ``weight``, so every read of
the weight sees ``W + dW``, however the parent uses it. Merging
(:func:`merge_lora`) writes ``W + dW`` into the layer and removes the adapter; the unmerged weight
is kept bit for bit while the adapter is present (:func:`merged_adapters` exports merged weights and
restores the exact training state).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LORA_TYPES",
    "LoRAWeight",
    "add_lora",
    "has_lora",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged_adapters",
]

#: Layer types that take an adapter (their ``weight`` is ``(out, in, *kernel)``).
LORA_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRAWeight(nn.Module):
    """Parametrisation ``W -> W + (alpha / r) * (B @ A).view_as(W)`` of a layer's weight.

    Args:
        weight: The weight it adapts, ``(C_out, C_in, *kernel)`` (only its shape and dtype are used).
        r: Rank of the update.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``.
    """

    def __init__(self, weight: torch.Tensor, r: int, alpha: float) -> None:
        super().__init__()
        if int(r) < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.r, fan_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, self.r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) do

    def delta(self) -> torch.Tensor:
        """The update ``(alpha / r) * B @ A`` as a ``(C_out, C_in * prod(kernel))`` matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().view_as(weight).to(weight.dtype)


def _adapter(module: nn.Module) -> LoRAWeight | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations["weight"] if isinstance(p, LoRAWeight)]
    return found[0] if found else None


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that carry an adapter, by name."""
    return {name: m for name, m in model.named_modules() if _adapter(m) is not None}


def has_lora(model: nn.Module) -> bool:
    """Whether any layer of ``model`` carries an adapter."""
    return any(_adapter(m) is not None for m in model.modules())


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
        if isinstance(m, LORA_TYPES) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
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
        if _adapter(module) is not None:
            raise ValueError(f"layer {name!r} already has a LoRA adapter")
        parametrize.register_parametrization(module, "weight", LoRAWeight(module.weight, r, alpha))
    return list(chosen)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` only (``<layer>.parametrizations.weight.0.lora_A``, ...)."""
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
    first = _adapter(next(iter(layers.values())))
    return {"targets": list(layers), "r": first.r, "alpha": first.alpha}


def merge_lora(model: nn.Module) -> list[str]:
    """Write ``W + dW`` into every adapted layer and remove the adapters (in place).

    Returns:
        The names of the merged layers; ``model`` then has its original state-dict keys.
    """
    names = []
    for name, module in lora_modules(model).items():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        names.append(name)
    return names


@contextlib.contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model``'s adapters are merged; on exit the adapters come back exactly.

    Used to export a LoRA-tuned model as plain weights (``save_pretrained``): inside, the state
    dict has the original keys with merged weights; afterwards training can continue, with the
    frozen base weights and the adapters bit for bit as before. A no-op without adapters.
    """
    layers = lora_modules(model)
    if not layers:
        yield model
        return
    saved: dict[str, tuple[torch.Tensor, LoRAWeight, bool]] = {}
    for name, module in layers.items():
        adapter = _adapter(module)
        original = module.parametrizations["weight"].original
        saved[name] = (original.detach().clone(), adapter, original.requires_grad)
    merge_lora(model)
    try:
        yield model
    finally:
        for name, module in layers.items():
            original, adapter, requires_grad = saved[name]
            with torch.no_grad():
                module.weight.data = original.to(module.weight.device)
            module.weight.requires_grad_(requires_grad)
            parametrize.register_parametrization(module, "weight", adapter)


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
    missing = [t for t in targets if t not in modules or not isinstance(modules[t], LORA_TYPES)]
    if missing:
        raise ValueError(
            f"'{source}': the adapter's layer {missing[0]!r} is not a convolution or linear layer "
            "of the base model"
        )
    for name in targets:
        module = modules[name]
        parametrize.register_parametrization(
            module, "weight", LoRAWeight(module.weight, int(config["r"]), float(config["alpha"]))
        )
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
