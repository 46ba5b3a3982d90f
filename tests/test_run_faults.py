"""Runs that survive: NaN, two runs on one folder, reruns, resumes, bad config types, disks, kills.

Each test reproduces a failure a user met (the issue "Runs that survive and scale", item 0) and
checks that the last good checkpoint stays intact.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import medgen
from medgen.callbacks import NonFiniteError, NumericalGuard
from medgen.callbacks.checkpoint_io import AtomicCheckpointIO
from medgen.runs.validation import ConfigTypeError
from medgen.utils.files import DiskWriteError, write_json
from medgen.utils.lock import FolderInUseError, RunLock
from medgen.utils.targets import register_target
from tests.conftest import tiny_overrides
from tests.helpers import cpu_trainer, phantom_images


def _tiny(path, *extra):
    return medgen.compose("train", [*tiny_overrides(path), "num_samples=0", *extra])


# --------------------------------------------------------------------------- non-finite values


def test_a_nan_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    medgen.train(_tiny(run, "export=false"))
    good = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # A fresh run in the same folder (a resumed one keeps the checkpoint's learning rate).
    with pytest.raises(NonFiniteError, match=r"step \d+: validation gives non-finite val/"):
        medgen.train(
            _tiny(run, "overwrite=true", "trainer.max_epochs=2", "model.optimizer.lr=1e30")
        )
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == good["global_step"]
    for key, value in after["state_dict"].items():
        assert torch.isfinite(value).all() if value.is_floating_point() else True, key
        torch.testing.assert_close(value, good["state_dict"][key], rtol=0, atol=0)
    assert not (run / "model").exists()  # no export of a diverged model
    json.loads((run / "metrics.json").read_text())  # the first run's, still valid JSON


class _NanBatches(torch.utils.data.Dataset):
    """Phantom images whose items ``bad`` are all NaN, with file-like names."""

    def __init__(self, bad: set[int]) -> None:
        self.images, self.bad = phantom_images(2, 16, 4), bad

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        image = self.images[i % 4].clone()
        if i in self.bad:
            image.fill_(float("nan"))
        return {"image": image, "path": f"/data/slice_{i:03d}.png"}


def _vae():
    from medgen.models import VAE

    return VAE(net={"channels": [4, 8], "norm_num_groups": 4}, kl_warmup_steps=0)


def test_a_nan_batch_is_skipped_and_training_goes_on():
    model = _vae()
    guard = NumericalGuard(max_bad_steps=2)
    loader = torch.utils.data.DataLoader(_NanBatches({2, 3}), batch_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_trainer(max_epochs=1, callbacks=[guard], limit_val_batches=0).fit(model, loader)
    assert guard.skipped == 1 and guard.bad_steps == 0  # batch 1 (items 2, 3) skipped
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(state[k], before[k]) for k in before)  # the others trained


def test_consecutive_nan_batches_stop_naming_step_terms_and_files():
    model = _vae()
    loader = torch.utils.data.DataLoader(_NanBatches({2, 3, 4, 5}), batch_size=2)
    trainer = cpu_trainer(max_epochs=1, callbacks=[NumericalGuard(2)], limit_val_batches=0)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(model, loader)
    message = str(info.value)
    assert "step 3: 2 consecutive steps" in message  # global step at the end of batch 2
    assert "train/loss" in message or "non-finite terms" in message
    assert "/data/slice_004.png" in message and "/data/slice_005.png" in message


def test_non_finite_weights_are_never_written(tmp_path):
    model = _vae()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="refusing to write the export"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(NonFiniteError, match="refusing to write checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": model.state_dict()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))


def test_metrics_json_is_valid_json_with_nan(tmp_path):
    path = write_json({"val/psnr": float("nan"), "val/ssim": 0.5}, tmp_path / "metrics.json")
    assert json.loads(path.read_text()) == {"val/psnr": None, "val/ssim": 0.5}


# --------------------------------------------------------------------------- output folders


def test_a_second_live_run_on_one_folder_is_refused_naming_the_first(tmp_path):
    with (
        RunLock(tmp_path, "medgen-train"),
        pytest.raises(FolderInUseError, match=rf"in use by process {os.getpid()}"),
    ):
        medgen.train(_tiny(tmp_path))
    assert not (tmp_path / ".medgen.lock").exists()
    # a lock left by a process that has ended is taken over
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    (tmp_path / ".medgen.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".medgen.lock").read_text())["pid"] == os.getpid()


def test_rerun_without_resume_is_refused_and_resume_keeps_last_ckpt_and_curves(tmp_path):
    run = tmp_path / "run"
    medgen.train(_tiny(run, "export=false"))
    with pytest.raises(FileExistsError, match="resume=last"):
        medgen.train(_tiny(run))
    metrics_csv = run / "logs" / "csv" / "metrics.csv"
    first_steps = {row["step"] for row in csv.DictReader(metrics_csv.open())}
    moved = tmp_path / "moved"
    run.rename(moved)  # a run folder moved between the interruption and the resume
    medgen.train(_tiny(moved, "resume=last", "trainer.max_epochs=2", "export=false"))
    checkpoints = sorted(p.name for p in (moved / "checkpoints").glob("last*.ckpt"))
    assert checkpoints == ["last.ckpt"]  # never last-v1.ckpt
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    rows = list(csv.DictReader((moved / "logs" / "csv" / "metrics.csv").open()))
    steps = [row["step"] for row in rows]
    assert first_steps <= set(steps)  # the curves of the first run are kept
    assert max(int(s) for s in steps) > max(int(s) for s in first_steps)
    medgen.train(_tiny(moved, "overwrite=true", "export=false"))  # explicitly afresh


def test_resume_auto_starts_then_continues_from_the_newest_loadable_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    first = medgen.train(_tiny(run, "resume=auto", "export=false"))  # nothing yet: a new run
    step = torch.load(first["checkpoint"], weights_only=True)["global_step"]
    # A node died while Lightning wrote its SLURM checkpoint: newer, but not loadable.
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"truncated")
    with caplog.at_level(logging.INFO, logger="medgen"):
        medgen.train(_tiny(run, "resume=auto", "trainer.max_epochs=2", "export=false"))
    assert "skipping" in caplog.text and "hpc_ckpt_1.ckpt" in caplog.text
    assert f"continuing from '{run / 'checkpoints' / 'last.ckpt'}'" in caplog.text
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (after["epoch"], after["global_step"]) == (1, 2 * step)


def test_config_types_are_checked_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigTypeError) as info:
        medgen.train(_tiny(tmp_path, "trainer.max_epochs=abc", "data.batch_size=four"))
    message = str(info.value)
    assert "trainer.max_epochs='abc' must be an integer or null" in message
    assert "data.batch_size='four' must be an integer" in message
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- files


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json({"a": 1}, tmp_path / "m.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = write_json({"a": 1}, tmp_path / "private.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)

    def full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskWriteError, match=r"cannot write '.*last.ckpt': no space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["state_dict"]["w"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    script = textwrap.dedent(
        f"""
        import time, torch
        from medgen.utils.files import atomic_path
        with atomic_path({str(path)!r}) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half a checkpoint")
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 3
    from medgen.utils.files import remove_stale_temporaries

    assert len(remove_stale_temporaries(tmp_path)) == 1  # what medgen-train cleans at start
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------- pre-emption


class _Signal(L.Callback):
    """Sends this process ``sig`` after global step ``at`` (what SLURM does on pre-emption)."""

    def __init__(self, at: int, sig: str = "SIGTERM") -> None:
        self.at, self.sig = at, sig

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), getattr(signal, self.sig))


register_target(_Signal, "tests.test_run_faults._Signal")


PREEMPTION_RUN = ["export=false", "data.train.length=16", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs of 4 batches, uninterrupted (shared by the signal variants)."""
    return medgen.train(_tiny(tmp_path_factory.mktemp("straight"), *PREEMPTION_RUN))


def test_a_sharded_run_exports_from_its_consolidated_checkpoint(straight_run, tmp_path):
    """Under FSDP rank 0 alone must not gather the in-memory model (the others never join)."""
    from types import SimpleNamespace

    from medgen.runs.memory import fsdp_strategy
    from medgen.runs.training import _export

    class _Sharded(torch.nn.Module):
        def cpu(self):
            raise AssertionError("touched the sharded in-memory model")

    trainer = SimpleNamespace(strategy=fsdp_strategy(auto_wrap=["medgen.nn.ResBlock"]))
    ckpt = Path(straight_run["checkpoint"])
    _export(_Sharded(), trainer, [], ckpt, tmp_path / "model")
    exported, from_ckpt = medgen.load(tmp_path / "model"), medgen.load(ckpt)  # EMA weights
    for key, value in from_ckpt.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(RuntimeError, match="consolidated checkpoint"):
        _export(_Sharded(), trainer, [], tmp_path / "missing.ckpt", tmp_path / "model2")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_saves_last_ckpt_and_resume_continues_bit_exactly(sig, straight_run, tmp_path):
    extra = PREEMPTION_RUN
    straight = straight_run
    signalled = [
        "+callbacks.signal._target_=tests.test_run_faults._Signal",
        "+callbacks.signal.at=3",
        f"+callbacks.signal.sig={sig}",
    ]
    with pytest.raises(SystemExit):  # stopped in the middle of epoch 0
        medgen.train(_tiny(tmp_path / "cut", *extra, *signalled))
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 3)
    resumed = medgen.train(_tiny(tmp_path / "cut", *extra, "resume=last"))
    a = torch.load(straight["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_a_dying_ddp_rank_stops_the_run_with_a_clear_error(tmp_path):
    from medgen.runs.training import RankFailedError
    from tests.helpers import DieOnRank

    register_target(DieOnRank, "tests.helpers.DieOnRank")
    cfg = _tiny(
        tmp_path,
        "trainer=ddp_cpu",
        "export=false",
        "data.train.length=16",
        "data.batch_size=2",
        "+callbacks.die._target_=tests.helpers.DieOnRank",
    )
    started = time.monotonic()
    with pytest.raises(
        RankFailedError, match=r"DDP rank 1 ended with exit code 3; the other ranks"
    ):
        medgen.train(cfg)
    assert time.monotonic() - started < 120  # no hang
