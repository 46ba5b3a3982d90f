"""Discovery (medgen list, medgen-train --list/--help, list_experiments), debug presets, plain
trainer overrides, progress bar choice, and composing/training twice in one process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import medgen
from medgen.cli import medgen_main, train_help
from medgen.runs.composition import compose
from medgen.runs.discovery import describe_config, format_listing, list_configs, listing

ROOT = Path(__file__).parents[1]
EXPERIMENT_DIR = ROOT / "medgen" / "configs" / "experiment"


def test_describe_config_skips_package_directive() -> None:
    text = "# @package _global_\n# A VAE on slices.\n# More detail.\ndefaults: []\n"
    assert describe_config(text) == "A VAE on slices."
    assert describe_config("key: 1\n# late comment\n") == ""


def test_every_experiment_has_a_description() -> None:
    experiments = medgen.list_experiments()
    assert set(experiments) == {p.stem for p in EXPERIMENT_DIR.glob("*.yaml")}
    missing = [name for name, text in experiments.items() if len(text) < 15]
    assert not missing, f"experiment YAMLs without a first-comment description: {missing}"
    assert experiments["quickstart"].startswith("A VAE on 64x64 phantom slices")


def test_list_configs_includes_own_config_dir(tmp_path: Path) -> None:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\n# My run.\n")
    found = list_configs("experiment", tmp_path)
    assert found["mine"] == "My run." and "quickstart" in found
    with pytest.raises(ValueError, match="no config group 'nope'"):
        list_configs("nope")


def test_medgen_list_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    medgen_main(["list", "samplers"])
    out = capsys.readouterr().out
    assert "ddim" in out and "[vp]" in out and "euler" in out and "[flow]" in out
    medgen_main(["list", "models"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("vae ") and "Variational autoencoder" in line for line in lines)
    assert set(listing("debug")) == {"fdr", "overfit", "profile"}
    assert format_listing({"a": "x", "long_name": "y"}) == "a          x\nlong_name  y"
    with pytest.raises(SystemExit):
        medgen_main(["list", "everything"])


def test_medgen_train_list_and_help_console_scripts() -> None:
    """The installed console scripts answer --list and --help (no Hydra, nothing trained)."""
    bin_dir = Path(sys.executable).parent
    listed = subprocess.run(
        [bin_dir / "medgen-train", "--list"], capture_output=True, text=True, check=True
    ).stdout
    assert listed.splitlines()[0].startswith("aggrgan ")
    assert any(line.startswith("quickstart ") and "VAE" in line for line in listed.splitlines())
    text = train_help()
    assert "medgen-train: train a generative model" in text and "powered by Hydra" not in text
    assert "ddpm_3d " in text and "debug=" in text and "--cfg job" in text


def test_plain_trainer_overrides_and_debug_presets() -> None:
    cfg = compose(
        "train",
        [
            "trainer.fast_dev_run=true",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=0.5",
            "trainer.max_steps=7",
        ],
    )
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.limit_train_batches == 3
    assert cfg.trainer.limit_val_batches == 0.5 and cfg.trainer.max_steps == 7
    assert compose("train", ["debug=fdr"]).trainer.fast_dev_run is True
    overfit = compose("train", ["experiment=vae_3d", "debug=overfit"])
    assert overfit.trainer.overfit_batches == 1 and overfit.data.spatial_dims == 3
    assert compose("train", ["debug=profile"]).trainer.profiler == "simple"
    assert compose("train").get("debug") is None


def test_progress_bar_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from medgen.callbacks import ProgressBar, progress

    assert isinstance(ProgressBar(), RichProgressBar)  # a terminal / script
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    bar = ProgressBar(refresh_rate=3)
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 3
    assert isinstance(ProgressBar(kind="rich"), RichProgressBar)
    with pytest.raises(ValueError, match="auto, rich or tqdm"):
        ProgressBar(kind="fancy")


def test_train_twice_in_one_process_keeps_cwd_and_logging(tmp_path: Path) -> None:
    """medgen.compose + medgen.train, twice, as in a notebook: no chdir, no logging changes."""
    cwd, root = os.getcwd(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    results = []
    for name in ("first", "second"):
        cfg = medgen.compose(
            "train",
            [
                f"paths.output_dir={tmp_path / name}",
                "data.train.size=16",
                "data.train.length=4",
                "data.val.length=2",
                "data.batch_size=2",
                "trainer.max_epochs=1",
                "~callbacks.progress_bar",
                "trainer.enable_model_summary=false",
                "num_samples=1",
            ],
        )
        results.append(medgen.train(cfg))
        assert os.getcwd() == cwd and root.handlers == handlers and root.level == level
    for name, result in zip(("first", "second"), results, strict=True):
        assert isinstance(result["model"], medgen.models.VAE)
        assert set(result["metrics"]) >= {"val/psnr", "val/ssim"}
        assert Path(result["model_dir"], "model.safetensors").is_file()
        assert Path(result["output_dir"]) == tmp_path / name
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"])  # same seed, same run


def test_lightning_lines_printed_once_under_root_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Hydra's job logging (root handlers), each Lightning INFO line comes out once."""
    import io

    import lightning  # noqa: F401 - adds its console handler

    from medgen.runs.composition import single_log_output

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    light = logging.getLogger("lightning")
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(light, "handlers", list(light.handlers))
    monkeypatch.setattr(light, "propagate", light.propagate)
    sink = io.StringIO()
    for h in light.handlers:  # Lightning's own console handler, pointed at a buffer
        if type(h) is logging.StreamHandler:
            monkeypatch.setattr(h, "stream", sink)
    single_log_output()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Seed set to 42")
    assert stream.getvalue().count("Seed set to 42") + sink.getvalue().count("Seed set") == 1
