"""What ``resume=`` restores, and which overrides the checkpoint overrides.

``resume=`` continues the same run: Lightning restores the weights, the optimiser and scheduler
states, the step and epoch and the callbacks' states, after the model was built from the *new*
config. The optimiser's state includes its learning rate, so ``model.optimizer.lr=...`` given with
``resume=`` is silently replaced by the checkpoint's. :func:`resume_messages` says what is restored
and warns for each optimiser/scheduler setting the checkpoint overrides; to train on with new
settings, start a new run from the weights (``model.init_from=<ckpt>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medgen.pretrained import CONFIG_NAME, CheckpointError

__all__ = ["check_resume_path", "resume_messages"]


def check_resume_path(path: str | Path) -> None:
    """Refuse an exported model folder given to ``resume=``, pointing to ``model.init_from``."""
    path = Path(path)
    if path.is_dir():
        what = "an exported model folder" if (path / CONFIG_NAME).is_file() else "a folder"
        raise CheckpointError(
            f"resume='{path}' is {what}, not a checkpoint: resume= continues a run from its "
            f".ckpt (e.g. resume=last). To start a new run from these weights, use "
            f"model.init_from={path}"
        )


def _diff(new: Any, old: Any, key: str) -> list[tuple[str, Any, Any]]:
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        out = []
        for k in sorted(set(new) | set(old), key=str):
            out += _diff(new.get(k), old.get(k), f"{key}.{k}")
        return out
    new, old = (list(v) if isinstance(v, tuple) else v for v in (new, old))
    return [] if new == old else [(key, new, old)]


def resume_messages(
    ckpt_path: str | Path, ckpt: Mapping[str, Any], model_cfg: Mapping[str, Any]
) -> tuple[str, list[str]]:
    """``(what is restored, [warnings])`` for resuming from ``ckpt`` with ``model_cfg``.

    Args:
        ckpt_path: The checkpoint (named in the messages).
        ckpt: The loaded checkpoint dict.
        model_cfg: The new run's (plain) model config.
    """
    callbacks = [str(k).split("{")[0] for k in (ckpt.get("callbacks") or {})]
    restored = (
        f"resume from '{ckpt_path}': restoring the model weights, "
        f"{len(ckpt.get('optimizer_states') or [])} optimiser state(s) (learning rates "
        f"included), {len(ckpt.get('lr_schedulers') or [])} scheduler state(s), step "
        f"{ckpt.get('global_step', 0)}, epoch {ckpt.get('epoch', 0)}"
        + (f", callbacks {', '.join(callbacks)}" if callbacks else "")
    )
    hparams = ckpt.get("hyper_parameters") or {}
    warnings = []
    for key, value in model_cfg.items():
        if not (str(key).startswith("optimizer") or str(key).startswith("scheduler")):
            continue
        if key not in hparams:
            continue
        for name, new, old in _diff(value, hparams[key], f"model.{key}"):
            warnings.append(
                f"{name}={new!r} is overridden by the checkpoint '{ckpt_path}', whose restored "
                f"optimiser/scheduler state keeps {old!r}; resume continues the old run. To train "
                f"on with the new setting, start a new run from its weights: "
                f"model.init_from={ckpt_path}"
            )
    return restored, warnings
