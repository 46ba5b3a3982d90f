"""Activation-memory measurement shared by benchmarks, examples and tests."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs.

    ``forward`` returns a tensor; its sum is back-propagated afterwards so the graph is freed.
    Storages saved by several ops are counted once. Tensors kept by activation checkpointing are
    not seen by these hooks.
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.sum().backward()
    return sum(storages.values())
