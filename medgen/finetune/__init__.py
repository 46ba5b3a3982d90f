"""Fine-tuning: start from existing weights, freeze, per-part learning rates, LoRA adapters.

- :func:`init_from`: load the matching weights of an export folder, a ``.ckpt``, an adapter folder
  or a foreign state dict (through :mod:`medgen.convert`), with a :class:`LoadReport`;
- :func:`freeze` / :func:`unfreeze` / :func:`lr_param_groups` by glob patterns, and
  :class:`FinetuneCallback` (frozen batch norms in eval mode, ``unfreeze_at_step``);
- :func:`add_lora` / :func:`merge_lora` / :func:`merged_adapters`: LoRA on 1D/2D/3D convolutions,
  linear layers and attention projections; :func:`save_adapter` and :func:`load` (``medgen.load``)
  of adapter folders checked against their base model's SHA-256;
- :func:`setup_finetune`: the ``model.init_from`` / ``model.finetune.*`` keys of ``medgen-train``.

See docs/finetune.md ("Fine-tune on your hospital data").
"""

from __future__ import annotations

from typing import Any

from medgen.finetune.adapters import is_adapter_folder, load, load_adapter, save_adapter
from medgen.finetune.freezing import freeze, frozen_norms, lr_param_groups, unfreeze
from medgen.finetune.loading import LoadReport, adapt_input_channels, init_from, read_weights
from medgen.finetune.lora import add_lora, has_lora, lora_state_dict, merge_lora, merged_adapters
from medgen.finetune.resume import check_resume_path, resume_messages
from medgen.finetune.setup import FinetunePlan, apply_finetune, setup_finetune

__all__ = [
    "FinetuneCallback",
    "FinetunePlan",
    "LoadReport",
    "adapt_input_channels",
    "add_lora",
    "apply_finetune",
    "check_resume_path",
    "export_adapter",
    "freeze",
    "frozen_norms",
    "has_lora",
    "init_from",
    "is_adapter_folder",
    "load",
    "load_adapter",
    "lora_state_dict",
    "lr_param_groups",
    "merge_lora",
    "merged_adapters",
    "read_weights",
    "resume_messages",
    "save_adapter",
    "setup_finetune",
    "unfreeze",
]


def export_adapter(
    model: Any,
    directory: Any,
    callbacks: list[Any] = (),
    overwrite: bool = True,
    checkpoint: Any = None,
):
    """After a LoRA run: write the adapter (EMA weights when an EMA callback ran) to ``directory``.

    ``checkpoint``: take the trained adapters (and EMA weights) from this ``.ckpt`` instead of
    ``model`` (``ddp_spawn``, where this process's model and callbacks never saw training).
    Returns the folder, or ``None`` when the model has no adapters or no ``init_from`` base.
    """
    import contextlib

    plan = getattr(model, "finetune_plan", None)
    if plan is None or not plan.lora or not plan.init_from or not has_lora(model):
        return None
    if checkpoint is not None:
        trained = load(checkpoint, merge=False)  # EMA weights, adapters kept
        return save_adapter(trained, directory, plan.init_from, overwrite=overwrite)
    ema = next((c for c in callbacks if hasattr(c, "swapped") and hasattr(c, "shadow")), None)
    context = ema.swapped(model) if ema is not None else contextlib.nullcontext()
    with context:
        return save_adapter(model, directory, plan.init_from, overwrite=overwrite)


def __getattr__(name: str) -> Any:
    # The callback needs Lightning; import it on first use so that ``import medgen`` stays light.
    if name == "FinetuneCallback":
        from medgen.finetune.callback import FinetuneCallback

        return FinetuneCallback
    raise AttributeError(f"module 'medgen.finetune' has no attribute {name!r}")
