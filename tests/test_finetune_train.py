"""medgen-train with model.init_from / model.finetune.*, the adapter export, resume messages."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import medgen
from medgen.pretrained import CheckpointError, load_checkpoint_file
from tests.conftest import tiny_overrides

SMALL_VAE = [
    "model.net.channels=[4,8]",
    "model.net.latent_channels=2",
    "model.net.norm_num_groups=2",
    "data.train.size=16",
    "data.val.size=16",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny quickstart run: its export is what the fine-tuning runs start from."""
    out = tmp_path_factory.mktemp("ft") / "quickstart"
    cfg = medgen.compose("train", [*tiny_overrides(out), *SMALL_VAE, "num_samples=0"])
    return medgen.train(cfg)


def test_finetune_vae_starts_a_new_run_from_the_export(base_run, tmp_path, caplog):
    out = tmp_path / "ft"
    overrides = [
        *tiny_overrides(out, "finetune_vae"),
        *SMALL_VAE,
        f"model.init_from={base_run['model_dir']}",
        "model.finetune.freeze=[net.decoder.*]",
        "callbacks.ema.decay=0.999",
        "num_samples=0",
    ]
    with caplog.at_level(logging.INFO, logger="medgen"):
        result = medgen.train(medgen.compose("train", overrides))
    report = json.loads((out / "init_from.json").read_text())
    assert report["loaded"] > 0 and not report["missing"] and not report["unexpected"]
    assert set(report["per_submodule"]) == {"net.encoder", "net.decoder"}
    assert "init_from" in caplog.text and "parameters trainable" in caplog.text
    base, tuned = medgen.load(base_run["model_dir"]), medgen.load(result["model_dir"])
    ckpt = load_checkpoint_file(result["checkpoint"])
    assert ckpt["global_step"] == 2  # a new run: step counting starts at 0 (8 images / 4)
    # the frozen decoder is the loaded one; the encoder trained, and its EMA (decay 0.999, two
    # steps) stayed next to the loaded weights, not next to a fresh initialisation
    for key, value in base.net.decoder.state_dict().items():
        assert torch.equal(tuned.net.decoder.state_dict()[key], value), key
    enc_base = torch.cat([p.flatten() for p in base.net.encoder.parameters()])
    enc_tuned = torch.cat([p.flatten() for p in tuned.net.encoder.parameters()])
    assert 0 < (enc_tuned - enc_base).abs().max() < 1e-3


def test_resume_says_what_it_restores_and_refuses_an_export_folder(base_run, caplog):
    out = base_run["output_dir"]
    with pytest.raises(CheckpointError, match=r"model\.init_from="):
        medgen.train(
            medgen.compose(
                "train", [*tiny_overrides(out), *SMALL_VAE, f"resume={base_run['model_dir']}"]
            )
        )
    cfg = medgen.compose(
        "train",
        [
            *tiny_overrides(out),
            *SMALL_VAE,
            "resume=last",
            "trainer.max_epochs=2",
            "model.optimizer.lr=1e-5",
            "num_samples=0",
        ],
    )
    with caplog.at_level(logging.INFO, logger="medgen"):
        medgen.train(cfg)
    assert "restoring the model weights, 1 optimiser state(s)" in caplog.text
    assert "model.optimizer.lr=1e-05 is overridden by the checkpoint" in caplog.text
