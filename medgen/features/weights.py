"""Local pretrained weights: find the file, check its SHA-256, read its state dict safely.

medgen never downloads. Pretrained extractors (Inception / ResNet for FID, VGG for perceptual and
style losses) read a state dict from a path the user gives, checked by SHA-256 when the digest is
known. Files are read with ``torch.load(..., weights_only=True)`` or as ``.safetensors``, so
nothing is unpickled beyond tensors. Every error names the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "check_sha256",
    "file_sha256",
    "load_state_dict",
    "local_weights_file",
    "offline_instructions",
]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as 64 lowercase hex digits (read in 1 MiB blocks).

    Args:
        path: The file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str) -> None:
    """Raise unless the file's SHA-256 is ``expected`` (compared case-insensitively).

    Args:
        path: The file.
        expected: The expected hex digest.

    Raises:
        ValueError: The digests differ; the message names the file and both digests.
    """
    actual = file_sha256(path)
    if actual.lower() != expected.lower():
        raise ValueError(f"{path}: SHA-256 mismatch: expected {expected}, file has {actual}")


def offline_instructions(arch: str, url: str, save_as: str = "weights.pth") -> str:
    """How to get torchvision weights onto a machine without internet, for error messages.

    Args:
        arch: The ``torchvision.models`` constructor name (``"vgg19"``, ``"inception_v3"``).
        url: The official weights URL.
        save_as: File name in the ``torch.save`` example.

    Returns:
        One sentence (no trailing full stop).
    """
    return (
        f"medgen never downloads; on a machine with internet download {url} (or run "
        f"`torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), "
        f"'{save_as}')`), copy the file here and pass its path as weights_path (the 8 hex "
        "digits in the official file name are the start of its SHA-256)"
    )


def local_weights_file(
    weights_path: str | Path | None,
    what: str,
    how: str,
    *,
    sha256: str | None = None,
    unset_hint: str = "",
) -> Path:
    """The weights file at ``weights_path``, checked to exist and, if given, to match ``sha256``.

    Args:
        weights_path: The path the user gave (``~`` is expanded); ``None`` or ``""`` is an error.
        what: What the weights are for (e.g. the architecture), for the messages.
        how: How to obtain the file offline (see :func:`offline_instructions`).
        sha256: Expected SHA-256 of the file; checked when given.
        unset_hint: Appended to the message when no path is given.

    Returns:
        The path, ``~`` expanded.

    Raises:
        FileNotFoundError: No path was given, or no file is there.
        ValueError: The SHA-256 differs.
    """
    if weights_path is None or str(weights_path) == "":
        raise FileNotFoundError(f"no weights_path given for {what}: {how}{unset_hint}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} weights file not found: {how}")
    if sha256 is not None:
        check_sha256(path, sha256)
    return path


def _read(path: Path) -> dict[str, Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a local ``.pth`` / ``.pt`` or ``.safetensors`` file, safely.

    ``.safetensors`` files are read with :func:`safetensors.torch.load_file`, anything else with
    ``torch.load(..., map_location="cpu", weights_only=True)``. A checkpoint that nests the
    weights under ``"state_dict"`` or ``"model"`` is unwrapped, and a ``"module."`` prefix (from
    ``DataParallel`` / DDP) is removed from every key.

    Args:
        path: The file.

    Returns:
        The state dict, on the CPU.

    Raises:
        FileNotFoundError: No file is at ``path``.
        ValueError: The file cannot be read (corrupt, truncated, a pickle that is more than
            tensors) or holds no state dict; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return _read(path)
    except ValueError:
        raise
    except Exception as exc:  # corrupt file, pickle refused by weights_only, bad safetensors
        raise ValueError(f"{path}: cannot read a state dict: {exc}") from exc
