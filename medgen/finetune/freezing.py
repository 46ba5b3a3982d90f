"""Freezing, per-pattern learning rates and gradual unfreezing, by glob patterns over names.

Patterns are :func:`fnmatch.fnmatchcase` globs over the full parameter names of the model being
trained (``net.encoder.*``, ``discriminator.model.0.*``); ``*`` also crosses dots. A pattern that
matches nothing is an error, never silence: a typo would otherwise train what was meant to be
frozen.

- Freezing (Yosinski et al., "How transferable are features in deep neural networks?", NeurIPS
  2014): frozen parameters get ``requires_grad=False``; normalisation layers with running
  statistics inside a frozen part are kept in eval mode, so batch statistics of the new data do not
  overwrite the pre-trained ones (:func:`frozen_norms`).
- FreezeD (Mo et al., "Freeze the Discriminator: a Simple Baseline for Fine-Tuning GANs", CVPR-W
  2020): freeze the discriminator's lower layers, e.g. ``freeze=[discriminator.model.0.*,
  discriminator.model.1.*]``.
- Discriminative learning rates (Howard & Ruder, "Universal Language Model Fine-tuning", ACL 2018):
  ``lr_multipliers={pattern: factor}`` become optimiser parameter groups with ``lr * factor``;
  gradual unfreezing: ``unfreeze_at_step`` (see :class:`medgen.finetune.FinetuneCallback`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["freeze", "frozen_norms", "lr_param_groups", "match", "unfreeze"]

_STAT_NORMS = (nn.modules.batchnorm._NormBase,)  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d


def match(names: Iterable[str], patterns: Sequence[str], what: str) -> dict[str, list[str]]:
    """Names matched by each pattern; an error for a pattern that matches nothing.

    Args:
        names: Candidate names (e.g. ``model.named_parameters()`` names).
        patterns: Glob patterns.
        what: The setting the patterns come from, named in errors (``model.finetune.freeze``).

    Raises:
        ValueError: naming the pattern that matches nothing and a few of the names.
    """
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    found: dict[str, list[str]] = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
        if not hits:
            tops = sorted({n.split(".")[0] + ".*" for n in names})
            raise ValueError(
                f"{what}: pattern {pattern!r} matches no parameter (parameters are named like "
                f"{', '.join(names[:3])}; top-level: {', '.join(tops)})"
            )
        found[str(pattern)] = hits
    return found


def freeze(model: nn.Module, patterns: Sequence[str], what: str = "freeze") -> list[str]:
    """Set ``requires_grad=False`` on the parameters matching ``patterns``.

    Returns:
        The frozen parameter names.

    Raises:
        ValueError: a pattern matches no parameter.
    """
    params = dict(model.named_parameters())
    names = sorted({n for hits in match(params, patterns, what).values() for n in hits})
    for name in names:
        params[name].requires_grad_(False)
    return names


def unfreeze(
    model: nn.Module, patterns: Sequence[str] = ("*",), what: str = "unfreeze"
) -> list[str]:
    """Set ``requires_grad=True`` on the parameters matching ``patterns``; returns their names."""
    params = dict(model.named_parameters())
    names = sorted({n for hits in match(params, patterns, what).values() for n in hits})
    for name in names:
        params[name].requires_grad_(True)
    return names


def frozen_norms(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    """Normalisation layers with running statistics whose tensors the freeze ``patterns`` cover.

    A layer counts as frozen when its ``running_mean`` buffer name (or, without running stats
    buffers, its ``weight``) matches a pattern, so both ``net.encoder.*`` and
    ``net.encoder.bn1.*`` cover ``net.encoder.bn1``.
    """
    out = []
    for name, module in model.named_modules():
        if isinstance(module, _STAT_NORMS) and module.track_running_stats:
            key = f"{name}.running_mean"
            if any(fnmatch.fnmatchcase(key, str(p)) for p in patterns):
                out.append(module)
    return out


def lr_param_groups(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    multipliers: Mapping[str, float],
    base_lr: float | None,
    what: str = "lr_multipliers",
) -> list[dict[str, Any]]:
    """Split ``params`` into optimiser groups, one per learning-rate factor.

    Args:
        model: The module that owns ``params`` (for their names).
        params: The parameters one optimiser is built for (e.g. the generator side).
        multipliers: ``{pattern: factor}``; the first matching pattern (in order) sets a
            parameter's factor, others keep factor 1.
        base_lr: The optimiser's ``lr``.
        what: Named in errors.

    Returns:
        Groups ``{"params": [...], "lr": base_lr * factor, "lr_factor": factor}``, the factor-1
        group first.

    Raises:
        ValueError: a pattern matches no parameter of ``model``, or ``base_lr`` is missing.
    """
    params = list(params)
    if not multipliers:
        return [{"params": params}]
    if base_lr is None:
        raise ValueError(f"{what} needs the optimiser config to set lr")
    named = dict(model.named_parameters())
    match(named, list(multipliers), what)  # every pattern matches some parameter of the model
    name_of = {id(p): n for n, p in named.items()}
    groups: dict[float, dict[str, Any]] = {}
    for p in params:
        name = name_of.get(id(p), "")
        factor = next(
            (float(f) for pat, f in multipliers.items() if fnmatch.fnmatchcase(name, str(pat))),
            1.0,
        )
        if factor < 0:
            raise ValueError(f"{what}: factor for {name!r} must be >= 0, got {factor}")
        group = groups.setdefault(
            factor, {"params": [], "lr": base_lr * factor, "lr_factor": factor}
        )
        group["params"].append(p)
    return sorted(groups.values(), key=lambda g: g["lr_factor"] != 1.0)
