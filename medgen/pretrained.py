"""Export and reload models without pickles: ``config.json`` + ``model.safetensors``.

An exported model is a folder holding

- ``config.json``: ``{"format": ..., "medgen_version": ..., "_target_": "medgen.models.VAE",
  "init_args": {...}}`` — the plain JSON constructor arguments of the LightningModule;
- ``model.safetensors``: the tensors of the networks needed for inference (EMA weights when the
  run used an EMA callback).

:func:`load` takes such a folder or a Lightning ``.ckpt`` and returns a ready model on the CPU in
eval mode. It never unpickles anything but tensors and plain containers
(``torch.load(..., weights_only=True)``), never touches the network, and checks the ``_target_``
against medgen's allowlist before building anything (as diffusers' ``from_pretrained`` does, but
offline only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medgen.utils.files import atomic_path, write_json
from medgen.utils.instantiate import check_targets
from medgen.utils.targets import UnsafeTargetError, canonical_name, public_name, resolve_target

FORMAT = "medgen-pretrained/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: marker key the EMA callback puts in its checkpoint state
EMA_STATE_MARKER = "medgen_ema"
#: checkpoint key recording the LoRA adapters of a fine-tuning run (:mod:`medgen.finetune`)
ADAPTERS_KEY = "medgen_lora"


class CheckpointError(ValueError):
    """A checkpoint or exported model folder is missing, corrupt or not a medgen model."""


def _version() -> str:
    from medgen.version import __version__

    return __version__


def resolve_model_class(target: Any, source: str | os.PathLike) -> type:
    """The model class a checkpoint or export names, from medgen's explicit list only.

    Old module paths (``medgen.models.gan.GAN``) resolve through the alias table; anything that is
    not a medgen model family is refused before any code runs.

    Raises:
        CheckpointError: naming ``source`` when the target is not an allowed model class.
    """
    try:
        name = canonical_name(target)
    except UnsafeTargetError as err:
        raise CheckpointError(f"'{source}': {err}") from None
    cls = resolve_target(name)
    # Model families are the list's medgen.models.* classes (or a class registered by trusted
    # code that exports like one).
    is_model = name.startswith("medgen.models.") or hasattr(cls, "save_pretrained")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and is_model):
        raise CheckpointError(f"'{source}': _target_={target!r} is not a medgen model family")
    return cls


def save_pretrained(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    init_args: Mapping[str, Any],
    modules: tuple[str, ...],
    data_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory``.

    Args:
        model: The module to export.
        directory: Destination folder (created; existing files are replaced atomically).
        init_args: Plain JSON constructor arguments that rebuild ``model``.
        modules: Names of the submodules whose tensors are saved (the inference nets).
        data_info: What the model recorded of its training data (affine, preset), written as
            ``"data"`` (see :mod:`medgen.data.outputs`).

    Returns:
        The folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name in modules:
        sub = model.get_submodule(name)
        for key, value in sub.state_dict().items():
            state[f"{name}.{key}"] = value.detach().cpu().contiguous()
    from medgen.utils.numerics import check_finite_state

    check_finite_state(state, f"the export '{directory / WEIGHTS_NAME}'")
    cls = type(model)
    config = {
        "format": FORMAT,
        "medgen_version": _version(),
        "_target_": public_name(cls, strict=False),
        "modules": list(modules),
        "init_args": json.loads(json.dumps(dict(init_args))),
        "data": json.loads(json.dumps(dict(data_info or {}))),
    }
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(config, directory / CONFIG_NAME)
    return directory


def _load_folder(directory: Path) -> torch.nn.Module:
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if config_path.is_file() and '"medgen-adapter/' in config_path.read_text(errors="replace"):
        raise CheckpointError(
            f"'{directory}' is a LoRA adapter folder: load it with medgen.load (or "
            "medgen.finetune.load), which applies it to its base model"
        )
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"exported model folder '{directory}' has no '{p.name}'")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{config_path}' is not valid JSON: {err}") from err
    if not isinstance(config, dict) or "_target_" not in config or "init_args" not in config:
        raise CheckpointError(
            f"'{config_path}' is not a medgen model config (no _target_/init_args)"
        )
    cls = resolve_model_class(config["_target_"], config_path)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(
            f"'{weights_path}' is corrupt or not a safetensors file: {err}"
        ) from err
    model = build_model(cls, config["init_args"], config_path)
    _load_module_state(model, state, tuple(config.get("modules", ())), weights_path)
    model.data_info = _data_info(config.get("data"), config_path)
    return model


def _data_info(info: Any, source: Path) -> dict[str, Any]:
    from medgen.data.outputs import check_data_info

    try:
        return check_data_info(info, source)
    except UnsafeTargetError as err:
        raise CheckpointError(f"'{source}': data record: {err}") from err
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def build_model(cls: type, init_args: Any, source: str | os.PathLike) -> torch.nn.Module:
    """``cls(**init_args)`` with a :class:`CheckpointError` naming ``source`` when it fails."""
    if not isinstance(init_args, Mapping):
        raise CheckpointError(f"'{source}': constructor arguments are not a mapping")
    try:  # every nested config (nets, optimisers, presets), even those built only later
        check_targets(init_args)
    except UnsafeTargetError as err:
        raise CheckpointError(f"'{source}': {err}") from None
    # Arguments stored by an older medgen, as they were meant then (e.g. a changed default).
    init_args = getattr(cls, "upgrade_init_args", dict)(init_args)
    try:
        return cls(**dict(init_args))
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"'{source}': its configuration does not build a {cls.__name__}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _load_module_state(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    modules: tuple[str, ...],
    source: Path,
) -> None:
    expected = {
        f"{name}.{key}" for name in modules for key in model.get_submodule(name).state_dict()
    }
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"'{source}' does not match the model it configures: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name in modules:
        prefix = f"{name}."
        sub_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            model.get_submodule(name).load_state_dict(sub_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"'{source}' does not match the model it configures: {err}"
            ) from err


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with an error naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt, truncated or holds more than tensors: {err}"
        ) from err


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` and a clear error on failure."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint '{path}' has no 'state_dict'; not a Lightning checkpoint"
        )
    return ckpt


def ema_state_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the EMA callback state stored in a Lightning checkpoint, if any."""
    for state in ckpt.get("callbacks", {}).values():
        if isinstance(state, Mapping) and state.get(EMA_STATE_MARKER):
            return dict(state)
    return None


def _load_ckpt(path: Path, use_ema: bool, prepare: Any = None) -> torch.nn.Module:
    ckpt = load_checkpoint_file(path)
    hparams = ckpt.get("hyper_parameters")
    target = ckpt.get("medgen_target")
    if not isinstance(hparams, Mapping) or not isinstance(target, str):
        raise CheckpointError(f"checkpoint '{path}' was not written by a medgen model")
    cls = resolve_model_class(target, path)
    model = build_model(cls, hparams, path)
    if ckpt.get(ADAPTERS_KEY):  # a LoRA run: the adapters must exist before the state loads
        if prepare is None:
            raise CheckpointError(
                f"checkpoint '{path}' holds LoRA adapters: load it with medgen.load "
                "(medgen.finetune.load), which adds them"
            )
        prepare(model, ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not match its model: {err}") from err
    try:  # state kept outside the state dict (image pools, the data record)
        model.on_load_checkpoint(ckpt)
    except (ValueError, UnsafeTargetError) as err:
        raise CheckpointError(f"checkpoint '{path}': {err}") from err
    ema = ema_state_from_checkpoint(ckpt) if use_ema else None
    if ema is not None:
        sub = model.get_submodule(ema["attribute"])
        sub.load_state_dict({**sub.state_dict(), **ema["shadow"]}, strict=True)
    return model


def load(path: str | os.PathLike, use_ema: bool = True, prepare: Any = None) -> torch.nn.Module:
    """Load a medgen model from an exported folder or a Lightning ``.ckpt``, offline.

    Args:
        path: A folder written by ``save_pretrained`` or a checkpoint written by ``medgen-train``.
        use_ema: For checkpoints, replace the averaged submodule's weights with the EMA weights
            when the run had an EMA callback (exported folders already hold the EMA weights).
        prepare: For checkpoints, ``prepare(model, checkpoint)`` runs on the built model before
            its state loads (:func:`medgen.finetune.load` adds a LoRA run's adapters there).

    Returns:
        The model on the CPU, in eval mode.

    Raises:
        CheckpointError: naming the file if it is missing, corrupt or not a medgen model.
    """
    path = Path(path)
    if path.is_dir():
        model = _load_folder(path)
    elif path.is_file():
        model = _load_ckpt(path, use_ema, prepare)
    else:
        raise CheckpointError(f"no checkpoint or exported model at '{path}'")
    return model.cpu().eval()
