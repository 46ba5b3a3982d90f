"""End-to-end runs: train, resume, export, load, sample and evaluate, from Python and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medgen
import medgen.data
from medgen.pretrained import CheckpointError, load_checkpoint_file
from tests.conftest import EXPERIMENTS, tiny_overrides


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny quickstart run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("quickstart")
    cfg = medgen.compose("train", tiny_overrides(out) + ["trainer.max_epochs=2"])
    result = medgen.train(cfg)
    return out, result


# Latent diffusion needs a trained autoencoder first (tests/test_models_diffusion.py and
# tests/test_medical_diffusion_fidelity.py run both stages); the fine-tuning experiments need
# weights to start from (model.init_from: tests/test_finetune_train.py).
NEEDS_AUTOENCODER = {
    "ldm_3d",
    "medical_diffusion",
    "medical_diffusion_full",
    "finetune_vae",
    "finetune_pix2pix",
    "finetune_ldm_3d",
}


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in NEEDS_AUTOENCODER])
def test_fast_dev_run_every_experiment(experiment, tmp_path):
    cfg = medgen.compose(
        "train", tiny_overrides(tmp_path, experiment) + ["++trainer.fast_dev_run=true"]
    )
    result = medgen.train(cfg)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    if getattr(medgen.load(tmp_path / "model"), "unconditional", True):
        assert len(result["samples"]) == 2
    else:  # translation models draw no unconditional samples
        assert "samples" not in result


def test_train_writes_every_output(trained):
    out, result = trained
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "checkpoints").glob("best-*.ckpt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val/psnr", "val/ssim", "val/ms_ssim", "val/recon"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics == result["metrics"]
    assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors"}
    samples = sorted((out / "samples").glob("sample_*.png"))
    assert [p.name for p in samples] == ["sample_0000.png", "sample_0001.png"]
    assert list((out / "samples").glob("epoch0001_reconstructions.png"))
    assert (out / "logs" / "csv" / "metrics.csv").is_file()
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"


def test_export_and_checkpoint_load_identically(trained):
    out, _ = trained
    exported = medgen.load(out / "model")
    from_ckpt = medgen.load(out / "checkpoints" / "last.ckpt")  # EMA weights by default
    assert not exported.training
    x = torch.rand(3, 1, 64, 64)  # quickstart size
    torch.testing.assert_close(exported.reconstruct(x), from_ckpt.reconstruct(x), rtol=0, atol=0)
    torch.testing.assert_close(
        exported.sample(4, seed=3), from_ckpt.sample(4, seed=3), rtol=0, atol=0
    )
    raw = medgen.load(out / "checkpoints" / "last.ckpt", use_ema=False)
    assert not torch.equal(raw.reconstruct(x), exported.reconstruct(x))


def test_checkpoint_holds_only_plain_data(trained):
    out, _ = trained
    ckpt = load_checkpoint_file(out / "checkpoints" / "last.ckpt")  # weights_only=True inside
    assert ckpt["medgen_target"] == "medgen.models.VAE"  # the public name, not the module path
    assert isinstance(ckpt["hyper_parameters"]["optimizer"], dict)


def test_resume_continues_as_if_never_stopped(tmp_path):
    straight = medgen.train(
        medgen.compose("train", tiny_overrides(tmp_path / "a") + ["trainer.max_epochs=2"])
    )
    first = tiny_overrides(tmp_path / "b") + ["trainer.max_epochs=1", "export=false"]
    medgen.train(medgen.compose("train", first))
    resumed = medgen.train(
        medgen.compose(
            "train", tiny_overrides(tmp_path / "b") + ["trainer.max_epochs=2", "resume=last"]
        )
    )
    a = torch.load(straight["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    ema_a = next(v for v in a["callbacks"].values() if "shadow" in v)["shadow"]
    ema_b = next(v for v in b["callbacks"].values() if "shadow" in v)["shadow"]
    for key, value in ema_a.items():
        torch.testing.assert_close(ema_b[key], value, rtol=0, atol=0, msg=key)
    assert straight["metrics"] == resumed["metrics"]


def test_missing_and_corrupt_checkpoints_are_named(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="nope.ckpt"):
        medgen.train(medgen.compose("train", tiny_overrides(tmp_path) + [f"resume={missing}"]))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x04this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        medgen.load(corrupt)
    with pytest.raises(CheckpointError, match="nothing_here"):
        medgen.load(tmp_path / "nothing_here")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        medgen.load(folder)


def test_truncated_export_is_named(trained, tmp_path):
    out, _ = trained
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((out / "model" / "config.json").read_bytes())
    weights = (out / "model" / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        medgen.load(folder)


def test_export_config_with_foreign_target_is_refused(trained, tmp_path):
    out, _ = trained
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((out / "model" / "config.json").read_text())
    config["_target_"] = "os.system"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((out / "model" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="os.system"):
        medgen.load(folder)


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = medgen.compose("train", tiny_overrides(blocker / "out"))
    with pytest.raises(PermissionError, match="a_file"):
        medgen.train(cfg)


# ---------------------------------------------------------------- command line (subprocesses)
def _script(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    entry = {
        "medgen-train": "train_main",
        "medgen-sample": "sample_main",
        "medgen-eval": "eval_main",
    }
    return [sys.executable, "-c", f"from medgen.cli import {entry[name]}; {entry[name]}()"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_train_sample_eval(tmp_path):
    out = tmp_path / "run"
    _run(_script("medgen-train") + tiny_overrides(out), tmp_path)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["val/psnr"] > 0

    digests = []
    for name in ("s1", "s2"):
        _run(
            _script("medgen-sample")
            + [
                f"checkpoint={out / 'checkpoints' / 'last.ckpt'}",
                "num_samples=3",
                "seed=7",
                f"output_dir={tmp_path / name}",
            ],
            tmp_path,
        )
        files = sorted((tmp_path / name).iterdir())
        assert [f.name for f in files] == [f"sample_{i:04d}.png" for i in range(3)]
        digests.append([_digest(f) for f in files])
    assert digests[0] == digests[1], "same seed must give byte-identical files"
    assert len(set(digests[0])) == 3, "samples of one run must differ"
    _run(
        _script("medgen-sample")
        + [
            f"checkpoint={out / 'model'}",
            "num_samples=3",
            "seed=8",
            f"output_dir={tmp_path / 's3'}",
        ],
        tmp_path,
    )
    assert _digest(tmp_path / "s3" / "sample_0000.png") != digests[0][0]

    report = tmp_path / "eval.json"
    _run(
        _script("medgen-eval")
        + [f"real={tmp_path / 's1'}", f"fake={tmp_path / 's3'}", f"output={report}"],
        tmp_path,
    )
    metrics = json.loads(report.read_text())
    assert metrics["mode"] == "paired" and metrics["n"] == 3
    assert 0 < metrics["psnr"] < 100 and metrics["ssim"] < 1
    assert not (tmp_path / "outputs").exists(), "sample/eval must not litter the working folder"


def test_cli_prints_config_and_lists_experiments(tmp_path):
    proc = _run(_script("medgen-train") + ["--cfg", "job", "trainer.max_epochs=7"], tmp_path)
    assert "max_epochs: 7" in proc.stdout and "_target_: medgen.models.VAE" in proc.stdout
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    bad = subprocess.run(
        _script("medgen-train") + ["experiment=nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "quickstart" in bad.stderr and "nope" in bad.stderr


def test_3d_run_writes_volumes(tmp_path):
    cfg = medgen.compose("train", tiny_overrides(tmp_path, "vae_3d") + ["data.train.size=16"])
    result = medgen.train(cfg)
    samples = [Path(p) for p in result["samples"]]
    assert [p.name for p in samples] == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    volume = medgen.data.read(samples[0])
    assert volume.shape == (1, 16, 16, 16) and volume.dtype == torch.float32
    logged = {p.name for p in (tmp_path / "samples").iterdir()}
    assert {"epoch0000_inputs.png", "epoch0000_inputs_00.nii.gz"} <= logged


def test_tensorboard_logger(tmp_path):
    cfg = medgen.compose("train", tiny_overrides(tmp_path) + ["logger=tensorboard"])
    medgen.train(cfg)
    assert list((tmp_path / "logs" / "tensorboard").rglob("events.out.tfevents.*"))


def test_load_works_with_the_network_switched_off(trained, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out, _ = trained
    model = medgen.load(out / "model")
    assert model.sample(2, seed=0).shape == (2, 1, 64, 64)


def test_ddp_spawn_two_cpu_processes(tmp_path):
    cfg = medgen.compose("train", tiny_overrides(tmp_path) + ["trainer=ddp_cpu"])
    result = medgen.train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "val/psnr" in result["metrics"]
    exported = medgen.load(tmp_path / "model")
    from_ckpt = medgen.load(tmp_path / "checkpoints" / "last.ckpt")
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(exported.reconstruct(x), from_ckpt.reconstruct(x), rtol=0, atol=0)
