"""The ``model.init_from`` and ``model.finetune.*`` config keys, applied to a built model.

These keys belong to the run, not to the model's constructor: :class:`medgen.models.base.
GenerativeModule` declares them in ``config_only_keys``, so building ``cfg.model`` never passes
them on, and ``medgen-train`` calls :func:`setup_finetune` on the built model (before any
checkpoint is restored). See docs/finetune.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from medgen.finetune.freezing import freeze, lr_param_groups, match
from medgen.finetune.lora import add_lora

log = logging.getLogger("medgen")

__all__ = ["FINETUNE_KEYS", "FinetunePlan", "apply_finetune", "setup_finetune"]

#: Keys of ``model.finetune`` and their meaning (docs/finetune.md).
FINETUNE_KEYS = {
    "strict": "init_from: refuse unless every key loads",
    "reinit_mismatched": "init_from: re-initialise shape-mismatched layers (else refuse)",
    "use_ema": "init_from a .ckpt: load its EMA weights",
    "converter": "init_from foreign weights through this medgen.convert converter",
    "converter_options": "the foreign net's configuration for the converter",
    "freeze": "glob patterns of parameters to freeze",
    "lr_multipliers": "{pattern: factor} learning-rate factors (optimiser param groups)",
    "unfreeze_at_step": "step (or {pattern: step}) at which frozen parameters unfreeze",
    "lora": "{r, alpha, modules, target, exclude}: LoRA adapters instead of full fine-tuning",
}
_LORA_KEYS = ("r", "alpha", "modules", "target", "exclude")


@dataclass
class FinetunePlan:
    """What fine-tuning changed on a model; kept as ``model.finetune_plan``.

    The model's optimiser builder asks it for parameter groups (:meth:`param_groups`).
    """

    init_from: str | None = None
    freeze: list[str] = field(default_factory=list)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    unfreeze_at_step: int | dict[str, int] | None = None
    lora: dict[str, Any] | None = None

    def param_groups(self, model: nn.Module, params: Any, config: Mapping[str, Any]) -> list:
        """Optimiser parameter groups for ``params`` (one per learning-rate factor)."""
        return lr_param_groups(
            model, params, self.lr_multipliers, config.get("lr"), "model.finetune.lr_multipliers"
        )


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def apply_finetune(
    model: nn.Module,
    freeze_patterns: Sequence[str] = (),
    lr_multipliers: Mapping[str, float] | None = None,
    unfreeze_at_step: int | Mapping[str, int] | None = None,
    lora: Mapping[str, Any] | None = None,
    init_from: str | None = None,
) -> list[Any]:
    """Freeze, add LoRA adapters and set learning-rate factors on a built medgen model.

    Args:
        model: The model (before training starts).
        freeze_patterns: Glob patterns of parameters to freeze (each must match).
        lr_multipliers: ``{pattern: factor}``.
        unfreeze_at_step: A step, or ``{pattern: step}``.
        lora: ``{"r": 8, "alpha": 16, "modules": ["net"], "target": [...], "exclude": [...]}``:
            the ``modules`` (default: the model's ``export_modules``) are frozen and their
            convolutions/linear layers matching ``target`` (default: all of them) get adapters.
        init_from: The weights the run started from (recorded for the adapter export).

    Returns:
        The callbacks the trainer needs (a :class:`~medgen.finetune.FinetuneCallback` when
        something is frozen or scheduled).

    Raises:
        ValueError: a pattern matches nothing, or an unknown LoRA key.
    """
    from medgen.finetune.callback import FinetuneCallback, unfreeze_schedule

    freeze_patterns = _as_list(freeze_patterns)
    lr_multipliers = {str(k): float(v) for k, v in dict(lr_multipliers or {}).items()}
    lora_spec = None
    if lora:
        unknown = sorted(set(lora) - set(_LORA_KEYS))
        if unknown:
            raise ValueError(
                f"model.finetune.lora.{unknown[0]} is not a LoRA setting; known: {_LORA_KEYS}"
            )
        modules = _as_list(lora.get("modules")) or list(getattr(model, "export_modules", ()))
        for name in modules:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(False)
        targets = _as_list(lora.get("target")) or [f"{m}.*" for m in modules]
        r = int(lora.get("r", 8))
        names = add_lora(
            model,
            r=r,
            alpha=lora.get("alpha"),
            target=targets,
            exclude=_as_list(lora.get("exclude")),
            freeze_base=False,
        )
        lora_spec = {"r": r, "alpha": lora.get("alpha"), "modules": modules, "layers": len(names)}
    if freeze_patterns:
        freeze(model, freeze_patterns, "model.finetune.freeze")
    if lr_multipliers:
        match(dict(model.named_parameters()), list(lr_multipliers), "model.finetune.lr_multipliers")
    schedule = unfreeze_schedule(freeze_patterns, unfreeze_at_step)
    for pattern in schedule:
        match(dict(model.named_parameters()), [pattern], "model.finetune.unfreeze_at_step")
    model.finetune_plan = FinetunePlan(
        init_from=init_from,
        freeze=freeze_patterns,
        lr_multipliers=lr_multipliers,
        unfreeze_at_step=unfreeze_at_step,
        lora=lora_spec,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "fine-tuning: %d of %d parameters trainable (%.2f%%)",
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    if freeze_patterns or schedule:
        return [FinetuneCallback(freeze_patterns, unfreeze_at_step)]
    return []


def setup_finetune(
    model: nn.Module,
    model_cfg: Mapping[str, Any],
    resuming: bool = False,
    output_dir: str | Path | None = None,
    convert: Callable[..., Path] | None = None,
) -> list[Any]:
    """Apply ``model_cfg``'s ``init_from`` and ``finetune`` keys to the built ``model``.

    A run with ``init_from`` is a new run: the weights load here, before the trainer exists, so
    the optimiser is fresh, the step is 0 and the EMA callback starts from the loaded weights.
    When ``resuming``, the checkpoint's weights win and ``init_from`` is skipped (with a message),
    while freezing, learning-rate factors and adapters are set up again as before.

    With ``model.finetune.converter`` (foreign weights), ``convert(name, source, destination,
    **converter_options)`` (:func:`medgen.convert.convert`, passed in by the run layer) writes
    the converted export to ``<output_dir>/converted``, which is then the run's ``init_from``
    (and the base of its adapter).

    Returns:
        Extra callbacks for the trainer.

    Raises:
        ValueError: an unknown ``model.finetune`` key or a pattern that matches nothing;
        CheckpointError: ``init_from`` is not a model or does not fit (see :func:`init_from`).
    """
    from medgen.finetune.loading import init_from as load_weights

    init_path = model_cfg.get("init_from")
    settings = dict(model_cfg.get("finetune") or {})
    unknown = sorted(set(settings) - set(FINETUNE_KEYS))
    if unknown:
        raise ValueError(
            f"model.finetune.{unknown[0]} is not a fine-tuning setting; known: "
            + ", ".join(FINETUNE_KEYS)
        )
    if init_path == "???":
        raise ValueError(
            "model.init_from is required by this experiment: give the weights to start from, "
            "e.g. model.init_from=outputs/quickstart/model (an export folder or a .ckpt)"
        )
    if init_path in (None, "", "null"):
        init_path = None
    elif resuming:
        log.info(
            "resume: model.init_from=%s is not loaded (the checkpoint's weights win)", init_path
        )
    else:
        if settings.get("converter"):
            init_path = _convert(init_path, settings, output_dir, convert)
        report = load_weights(
            model,
            init_path,
            strict=bool(settings.get("strict", False)),
            reinit_mismatched=bool(settings.get("reinit_mismatched", True)),
            use_ema=bool(settings.get("use_ema", True)),
        )
        if output_dir is not None:
            from medgen.utils.files import write_json

            write_json(report.to_dict(), Path(output_dir) / "init_from.json")
    if not settings and init_path is None:
        return []
    return apply_finetune(
        model,
        freeze_patterns=_as_list(settings.get("freeze")),
        lr_multipliers=settings.get("lr_multipliers"),
        unfreeze_at_step=settings.get("unfreeze_at_step"),
        lora=settings.get("lora"),
        init_from=str(init_path) if init_path is not None else None,
    )


def _convert(
    source: Any, settings: Mapping[str, Any], output_dir: Any, convert: Callable[..., Path] | None
) -> Path:
    if convert is None or output_dir is None:
        raise ValueError(
            "model.finetune.converter needs the run layer (medgen-train); in Python, convert "
            "first with medgen.convert.convert(...) and call init_from on the export folder"
        )
    destination = Path(output_dir) / "converted"  # refused by the converter if it exists
    options = dict(settings.get("converter_options") or {})
    log.info("init_from: converting '%s' with %s", source, settings["converter"])
    return Path(convert(str(settings["converter"]), source, destination, **options))
