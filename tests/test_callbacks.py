"""Callbacks: EMA arithmetic and state, RNG state round trip, image/volume logging."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medgen.callbacks import EMA, RNGState
from medgen.callbacks.image_logger import orthogonal_slices, write_image_set
from medgen.data import read


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)
        self.other = nn.Linear(2, 2)


class _Trainer:
    global_step = 0


def test_ema_follows_its_formula_and_only_its_submodule():
    model = _Holder()
    ema = EMA(attribute="net", decay=0.9)
    ema.on_fit_start(None, model)
    assert set(ema.shadow) == {"weight", "bias"}
    expected = model.net.weight.detach().clone()
    trainer = _Trainer()
    for step in range(1, 4):
        with torch.no_grad():
            model.net.weight.add_(1.0)
        trainer.global_step = step
        ema.on_train_batch_end(trainer, model, None, None, 0)
        expected = 0.9 * expected + 0.1 * model.net.weight.detach()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    current = model.net.weight.detach().clone()
    with ema.swapped(model):
        torch.testing.assert_close(model.net.weight.detach(), expected)
    torch.testing.assert_close(model.net.weight.detach(), current)


def test_ema_state_round_trip_and_start_step():
    model = _Holder()
    ema = EMA(attribute="net", decay=0.5, start_step=10)
    ema.on_fit_start(None, model)
    with torch.no_grad():
        model.net.weight.fill_(3.0)
    trainer = _Trainer()
    trainer.global_step = 5  # before start_step: the shadow copies the weights
    ema.on_train_batch_end(trainer, model, None, None, 0)
    assert torch.all(ema.shadow["weight"] == 3.0)
    restored = EMA(attribute="net", decay=0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.shadow["weight"], ema.shadow["weight"])


def test_rng_state_round_trip():
    callback = RNGState()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = callback.state_dict()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    saved = torch.load(_roundtrip(state), weights_only=True)
    callback.load_state_dict(saved)
    callback.on_train_start(None, None)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_orthogonal_slices():
    volume = torch.zeros(1, 4, 6, 8)
    volume[0, 2, 3, 4] = 1.0
    view = orthogonal_slices(volume)
    assert view.shape == (1, 8, 24)
    assert view[0, 3, 4] == 1 and view[0, 2, 8 + 4] == 1 and view[0, 2, 16 + 3] == 1


def test_write_image_set_2d_and_3d(tmp_path):
    paths = write_image_set(torch.rand(3, 1, 8, 8), tmp_path, "grid2d", (0.0, 1.0))
    assert [p.name for p in paths] == ["grid2d.png"]
    vols = torch.rand(2, 1, 4, 6, 8) * 100
    paths = write_image_set(vols, tmp_path, "vol", (0.0, 100.0), spacing=(1.0, 2.0, 3.0))
    assert [p.name for p in paths] == ["vol.png", "vol_00.nii.gz", "vol_01.nii.gz"]
    back = read(paths[2])
    torch.testing.assert_close(torch.as_tensor(back)[0].float(), vols[1, 0])
    assert np.allclose(np.diag(np.asarray(back.affine))[:3], [1.0, 2.0, 3.0])


def test_atomic_checkpoint_io_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    from medgen.callbacks.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def boom(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
