"""LoRA adapter folders: the adapter alone, applied to its base model (checked by SHA-256).

An adapter folder holds

- ``config.json``: ``{"format": "medgen-adapter/1", "base": {"path", "sha256"}, "model":
  {"_target_", "init_args", "modules", "data"}, "lora": {"targets", "r", "alpha"},
  "extra_keys": [...]}``;
- ``adapter.safetensors``: the LoRA tensors, plus the few export tensors that differ from the base
  (``extra_keys``: e.g. re-initialised or unfrozen layers, batch-norm statistics).

:func:`load` (``medgen.load``) of such a folder reads the base model the adapter was trained from
(an export folder or a ``.ckpt``), refuses it when its SHA-256 differs from the recorded one, builds
the fine-tuned model's configuration, loads the base weights and the extra tensors, adds the
adapters and (by default) merges them, returning a plain model like any export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from medgen.features.weights import file_sha256
from medgen.finetune.lora import apply_lora_state, lora_config, lora_state_dict, merge_lora
from medgen.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    build_model,
    resolve_model_class,
)
from medgen.utils.files import atomic_path, write_json
from medgen.utils.targets import public_name

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_WEIGHTS",
    "is_adapter_folder",
    "load",
    "load_adapter",
    "save_adapter",
]

ADAPTER_FORMAT = "medgen-adapter/1"
ADAPTER_WEIGHTS = "adapter.safetensors"
_BASE = ".weight_base"  # an adapted layer's frozen weight


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save_adapter`."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == ADAPTER_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def base_weights_file(base: str | os.PathLike) -> Path:
    """The file whose SHA-256 identifies a base model: ``model.safetensors`` or the ``.ckpt``."""
    base = Path(base)
    path = base / WEIGHTS_NAME if base.is_dir() else base
    if not path.is_file():
        raise CheckpointError(f"base model '{base}' does not exist (no '{path}')")
    return path


def _plain_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """State of ``module`` without adapter tensors, under the layers' plain names."""
    return {
        prefix + (k[: -len(_BASE)] + ".weight" if k.endswith(_BASE) else k): v
        for k, v in module.state_dict().items()
        if not k.endswith((".lora_A", ".lora_B"))
    }


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the adapters of ``model`` (and tensors that differ from ``base``) to ``directory``.

    Args:
        model: A medgen model with LoRA adapters (:func:`medgen.finetune.add_lora`).
        directory: The adapter folder to write.
        base: The model the fine-tuning started from (export folder or ``.ckpt``).
        overwrite: Replace an adapter already in ``directory`` (otherwise refused).

    Returns:
        The folder.

    Raises:
        ValueError: ``model`` has no adapters. CheckpointError: ``base`` is missing, or the folder
            already holds a model and ``overwrite`` is false (nothing written).
    """
    from medgen.finetune.loading import read_weights

    directory = Path(directory)
    if (directory / CONFIG_NAME).exists() and not overwrite:
        raise CheckpointError(
            f"'{directory}' already holds a model or adapter; choose another folder "
            "(nothing was written)"
        )
    lora = lora_config(model)
    if not lora:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save")
    weights = base_weights_file(base)
    base_state = read_weights(base)
    modules = tuple(getattr(model, "export_modules", ())) or ("",)
    extras: dict[str, torch.Tensor] = {}
    for name in modules:
        sub = model.get_submodule(name) if name else model
        for key, value in _plain_state(sub, f"{name}." if name else "").items():
            ref = base_state.get(key)
            if ref is None or ref.shape != value.shape or not torch.equal(ref, value.cpu()):
                extras[key] = value.detach().cpu().contiguous()
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    config = {
        "format": ADAPTER_FORMAT,
        "base": {"path": str(Path(base).resolve()), "sha256": file_sha256(weights)},
        "model": {
            "_target_": public_name(type(model), strict=False),
            "init_args": json.loads(json.dumps(model.export_init_args())),
            "modules": list(modules),
            "data": json.loads(json.dumps(dict(getattr(model, "data_info", {}) or {}))),
        },
        "lora": lora,
        "extra_keys": sorted(extras),
    }
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file({**tensors, **extras}, str(tmp), metadata={"format": "pt"})
    write_json(config, directory / CONFIG_NAME)
    return directory


def load_adapter(
    path: str | os.PathLike, base: str | os.PathLike | None = None, merge: bool = True
) -> nn.Module:
    """Build the fine-tuned model of an adapter folder on its base model.

    Args:
        path: The adapter folder.
        base: The base model (export folder or ``.ckpt``); default: the path recorded in the
            adapter. Its SHA-256 must equal the recorded one.
        merge: Merge the adapters into the weights (a plain model); ``False`` keeps them as
            trainable adapters.

    Returns:
        The model on the CPU, in eval mode.

    Raises:
        CheckpointError: the folder is incomplete, the base is missing or has another hash, or
            the base does not fit the adapter's configuration.
    """
    from medgen.data.outputs import check_data_info
    from medgen.finetune.loading import read_state_file, read_weights

    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise CheckpointError(f"adapter folder '{path}' has no '{ADAPTER_WEIGHTS}'")
    try:
        config: Any = json.loads(config_path.read_text())
        recorded = config["base"]
        spec = config["model"]
        lora = config["lora"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"'{config_path}' is not a medgen adapter config: {err}") from err
    base_path = Path(base) if base is not None else Path(recorded["path"])
    if not base_path.exists():
        raise CheckpointError(
            f"the base model of adapter '{path}', '{base_path}', does not exist; pass the base "
            "model's path (medgen.load(adapter, base=...))"
        )
    digest = file_sha256(base_weights_file(base_path))
    if digest != recorded["sha256"]:
        raise CheckpointError(
            f"adapter '{path}' was trained on a base model with SHA-256 {recorded['sha256']}, "
            f"but '{base_path}' has SHA-256 {digest}: not the same weights"
        )
    tensors = read_state_file(weights_path)
    extra_keys = set(config.get("extra_keys", ()))
    extras = {k: v for k, v in tensors.items() if k in extra_keys}
    adapters = {k: v for k, v in tensors.items() if k not in extra_keys}
    base_state = read_weights(base_path)
    model = build_model(
        resolve_model_class(spec["_target_"], config_path), spec["init_args"], config_path
    )
    for name in spec.get("modules", ()):
        sub = model.get_submodule(name) if name else model
        prefix = f"{name}." if name else ""
        state = {}
        for key, ref in sub.state_dict().items():
            value = extras.get(prefix + key, base_state.get(prefix + key))
            if value is None or value.shape != ref.shape:
                got = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise CheckpointError(
                    f"base model '{base_path}' does not fit adapter '{path}': "
                    f"{prefix + key!r} is {got}, the model needs {tuple(ref.shape)}"
                )
            state[key] = value
        sub.load_state_dict(state, strict=True)
    try:
        apply_lora_state(model, lora, adapters, str(weights_path))
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if merge:
        merge_lora(model)
    model.data_info = check_data_info(spec.get("data"), config_path)
    return model.cpu().eval()


def load(
    path: str | os.PathLike,
    use_ema: bool = True,
    base: str | os.PathLike | None = None,
    merge: bool = True,
) -> nn.Module:
    """:func:`medgen.pretrained.load`, plus LoRA adapter folders and LoRA runs' checkpoints.

    This is ``medgen.load``: an export folder, a ``.ckpt`` (a LoRA run's with its adapters
    merged), or an adapter folder, whose base model (recorded path, or ``base``) must have the
    recorded SHA-256. ``merge=False`` keeps the adapters of a LoRA checkpoint or adapter folder.
    """
    from medgen import pretrained

    if Path(path).is_dir() and is_adapter_folder(path):
        return load_adapter(path, base=base, merge=merge)

    def add_adapters(model: nn.Module, ckpt: dict[str, Any]) -> None:
        # a LoRA run's checkpoint: its state has the adapters' keys; merged after loading
        try:
            apply_lora_state(model, ckpt[pretrained.ADAPTERS_KEY], None, str(path))
        except ValueError as err:
            raise CheckpointError(str(err)) from err

    model = pretrained.load(path, use_ema=use_ema, prepare=add_adapters)
    if merge:
        merge_lora(model)
    return model
