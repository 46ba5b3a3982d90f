"""``init_from``: start a model from existing weights, with a report of what loaded.

Sources (:func:`read_weights`): a medgen export folder (``config.json`` + ``model.safetensors``), a
LoRA adapter folder (applied to its base first), a Lightning ``.ckpt`` written by ``medgen-train``
(its EMA weights by default), or a foreign state dict (``.pt``/``.pth``/``.bin``/``.safetensors``)
read by name (foreign layouts: convert them first with :mod:`medgen.convert`, ``medgen-convert`` or
``model.finetune.converter``). Nothing is unpickled beyond tensors (``weights_only=True``) and
nothing downloads.

Weights load by name into the model the config builds, whose architecture may differ: keys with the
same name and shape load; the rest are reported as missing, unexpected or shape-mismatched, with
counts per submodule. A shape-mismatched layer is re-initialised on request: when only the input
channels of a convolution or linear weight differ (a new number of input channels), the pre-trained
filters are adapted as timm's ``adapt_input_conv`` does (Wightman, pytorch-image-models): summed
for one channel, repeated and rescaled for more, so that an image repeated over the channels gives
the pre-trained response; any other mismatch (e.g. a new number of output classes) keeps the new
model's fresh initialisation.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgen.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    ema_state_from_checkpoint,
    load_checkpoint_file,
    safe_torch_load,
)

log = logging.getLogger("medgen")

__all__ = ["LoadReport", "adapt_input_channels", "init_from", "read_weights"]

_WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "network")


@dataclass
class LoadReport:
    """What :func:`init_from` loaded into a model.

    Attributes:
        source: The weights' path.
        loaded: Keys loaded unchanged.
        adapted: Keys whose input channels were adapted (``key -> (source shape, model shape)``).
        reinitialised: Shape-mismatched keys left at the model's fresh initialisation.
        missing: Model keys absent from the source (fresh initialisation).
        unexpected: Source keys the model does not have (ignored).
        prefix: Prefix put in front of the source's keys to match the model (``"net."`` for a
            bare net state dict), or ``""``.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    reinitialised: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    prefix: str = ""

    @property
    def mismatched(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Shape-mismatched keys (adapted or re-initialised): ``key -> (source, model) shapes``."""
        return {**self.adapted, **self.reinitialised}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per submodule (the first two name parts): counts of each outcome."""
        table: dict[str, Counter] = {}
        outcomes = {
            "loaded": self.loaded,
            "adapted": list(self.adapted),
            "reinitialised": list(self.reinitialised),
            "missing": self.missing,
            "unexpected": self.unexpected,
        }
        for outcome, keys in outcomes.items():
            for key in keys:
                group = ".".join(key.split(".")[:2]) if key.count(".") > 1 else key.split(".")[0]
                table.setdefault(group, Counter())[outcome] += 1
        return {g: dict(c) for g, c in sorted(table.items())}

    def summary(self) -> str:
        """A table: one line per submodule, then the mismatched keys with both shapes."""
        cols = ("loaded", "adapted", "reinitialised", "missing", "unexpected")
        lines = [
            f"init_from '{self.source}'"
            + (f" (source keys prefixed with '{self.prefix}')" if self.prefix else "")
            + f": {len(self.loaded)} loaded, {len(self.adapted)} adapted, "
            f"{len(self.reinitialised)} re-initialised, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected",
            f"  {'submodule':<32}" + "".join(f"{c:>14}" for c in cols),
        ]
        for group, counts in self.counts().items():
            lines.append(f"  {group:<32}" + "".join(f"{counts.get(c, 0):>14}" for c in cols))
        for key, (src, dst) in self.mismatched.items():
            how = "adapted" if key in self.adapted else "re-initialised"
            lines.append(f"  shape {key}: source {src} -> model {dst} ({how})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (written to ``init_from.json`` by ``medgen-train``)."""
        return {
            "source": self.source,
            "prefix": self.prefix,
            "loaded": len(self.loaded),
            "adapted": {k: [list(a), list(b)] for k, (a, b) in self.adapted.items()},
            "reinitialised": {k: [list(a), list(b)] for k, (a, b) in self.reinitialised.items()},
            "missing": self.missing,
            "unexpected": self.unexpected,
            "per_submodule": self.counts(),
        }


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``torch.save`` file (a ``state_dict`` wrapper removed).

    Raises:
        CheckpointError: naming ``path`` when it is corrupt or holds no tensors.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"'{path}' is corrupt or not a safetensors file: {err}") from err
    else:
        state = safe_torch_load(path)
    for wrapper in _WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    tensors = (
        {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, Mapping)
        else {}
    )
    if not tensors:
        raise CheckpointError(f"'{path}' is not a model: it holds no state dict of tensors")
    return tensors


def _read_folder(path: Path) -> dict[str, torch.Tensor]:
    from medgen.finetune.adapters import is_adapter_folder, load_adapter

    if is_adapter_folder(path):
        model = load_adapter(path)
        return {
            f"{name}.{k}": v
            for name in model.export_modules
            for k, v in model.get_submodule(name).state_dict().items()
        }
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"'{path}' is not a model: an exported medgen model folder holds '{CONFIG_NAME}' and "
            f"'{WEIGHTS_NAME}'"
        )
    return read_state_file(path / WEIGHTS_NAME)


def read_weights(path: str | os.PathLike, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The state dict held by ``path`` (see the module docstring for the sources).

    Args:
        path: Export folder, adapter folder, ``.ckpt`` or foreign weights file.
        use_ema: For a ``.ckpt``, take the EMA weights of the averaged submodule when it has them.

    Raises:
        CheckpointError: naming ``path`` when it is missing, corrupt or not a model.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"init_from: no model at '{path}' (the path does not exist)")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".ckpt":
        ckpt = load_checkpoint_file(path)
        state = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
        ema = ema_state_from_checkpoint(ckpt) if use_ema else None
        if ema is not None:
            prefix = f"{ema['attribute']}."
            state.update({prefix + k: v for k, v in ema["shadow"].items()})
        return state
    return read_state_file(path)


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a pre-trained ``(C_out, C_src, *kernel)`` weight to ``in_channels`` input channels.

    As timm's ``adapt_input_conv``: one channel sums the source channels; more channels repeat the
    source channels cyclically and scale by ``C_src / in_channels``. Either way an input whose
    channels all hold the same image gives the pre-trained layer's response to that image
    repeated over its ``C_src`` channels.

    Returns:
        A weight of shape ``(C_out, in_channels, *kernel)``.
    """
    src = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // src)
    repeated = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return repeated * (src / in_channels)


def _best_prefix(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """The prefix (``""``, ``"net."``, ...) under which most source keys are model keys."""
    children = sorted({k.split(".")[0] for k in target})
    best, best_hits = "", sum(k in target for k in source)
    for child in children:
        hits = sum(f"{child}.{k}" in target for k in source)
        if hits > best_hits:
            best, best_hits = f"{child}.", hits
    return best


def _recorded_scalars(
    path: Path, target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Scalar buffers an export keeps as constructor arguments (e.g. a latent model's
    ``latent_scale``), for the model's scalar buffers the exported tensors lack: fine-tuning a
    latent diffusion model must keep the latent scale its net was trained with."""
    config = path / CONFIG_NAME
    if not path.is_dir() or not config.is_file():
        return {}
    try:
        init_args = json.loads(config.read_text()).get("init_args") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return {
        key: torch.tensor(float(value), dtype=target[key].dtype)
        for key, value in init_args.items()
        if key in target
        and key not in source
        and target[key].ndim == 0
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


def init_from(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = False,
    reinit_mismatched: bool = True,
    use_ema: bool = True,
    verbose: bool = True,
) -> LoadReport:
    """Load the matching weights of ``path`` into ``model`` and report what happened.

    Args:
        model: The model the config builds (a LightningModule or any ``nn.Module``).
        path: Export folder, adapter folder, ``.ckpt`` or foreign weights file.
        strict: Refuse (load nothing) unless every key of ``model`` loads with its shape and the
            source has no other keys.
        reinit_mismatched: Re-initialise shape-mismatched layers (adapting input channels where
            only they differ); ``False`` refuses shape mismatches, naming the first key and both
            shapes.
        use_ema: For a ``.ckpt``, load its EMA weights.
        verbose: Log the report (logger ``medgen``, level INFO).

    Returns:
        The :class:`LoadReport`.

    Raises:
        CheckpointError: ``path`` is not a model; with ``strict``, missing/unexpected/mismatched
            keys; without ``reinit_mismatched``, a shape mismatch. ``model`` is left unchanged.
    """
    source = read_weights(path, use_ema)
    target = model.state_dict()
    prefix = _best_prefix(source, target)
    source = {prefix + k: v for k, v in source.items()}
    source.update(_recorded_scalars(Path(path), target, source))
    report = LoadReport(source=str(path), prefix=prefix)
    new_state: dict[str, torch.Tensor] = {}
    for key, ref in target.items():
        if key not in source:
            report.missing.append(key)
            continue
        value = source[key]
        if tuple(value.shape) == tuple(ref.shape):
            new_state[key] = value.detach().to(ref.dtype)
            report.loaded.append(key)
            continue
        shapes = (tuple(value.shape), tuple(ref.shape))
        only_inputs = (
            value.ndim == ref.ndim >= 2
            and value.shape[0] == ref.shape[0]
            and value.shape[2:] == ref.shape[2:]
            and ref.is_floating_point()
        )
        if only_inputs:
            new_state[key] = adapt_input_channels(value.detach().to(ref.dtype), ref.shape[1])
            report.adapted[key] = shapes
        else:
            report.reinitialised[key] = shapes
    report.unexpected = [k for k in source if k not in target]
    if not report.loaded and not report.adapted:
        raise CheckpointError(
            f"init_from: no weight of '{path}' fits {type(model).__name__} (first model key "
            f"{next(iter(target), None)!r}, first source key {next(iter(source), None)!r})"
        )
    if report.mismatched and (strict or not reinit_mismatched):
        key, (src, dst) = next(iter(report.mismatched.items()))
        raise CheckpointError(
            f"init_from '{path}': {key!r} has shape {src} in the source but {dst} in the model "
            f"({len(report.mismatched)} mismatched keys; nothing was loaded). Set "
            "reinit_mismatched=true (model.finetune.reinit_mismatched) to re-initialise them"
            + (" and strict=false" if strict else "")
        )
    if strict and (report.missing or report.unexpected):
        first = (report.missing or report.unexpected)[0]
        raise CheckpointError(
            f"init_from '{path}' with strict=true: {len(report.missing)} missing and "
            f"{len(report.unexpected)} unexpected keys, first {first!r} "
            f"({'missing' if report.missing else 'unexpected'}); nothing was loaded"
        )
    model.load_state_dict(new_state, strict=False)
    if verbose:
        log.info("%s", report.summary())
    return report
