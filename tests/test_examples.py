"""Examples that run in seconds are executed, so the documentation cannot drift from the code."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_nets_speed_memory_example(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "nets_speed_memory.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "parameters:" in out and "perplexity" in out
    diff = float(out.split("channels-last-3d max difference:")[1].split()[0])
    assert diff < 1e-4
    full = float(out.split("saved for backward:")[1].split()[0])
    ckpt = float(out.split("saved with checkpointing (outside blocks):")[1].split()[0])
    assert ckpt < full


def test_gan_augmentation_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv
    import sys

    monkeypatch.setattr(sys, "argv", ["gan_augmentation.py", str(tmp_path), "--num-samples", "3"])
    runpy.run_path(str(EXAMPLES / "gan_augmentation.py"), run_name="__main__")
    synthetic = tmp_path / "synthetic"
    assert sorted(p.name for p in synthetic.glob("*.png")) == [
        f"aggrgan_{i:04d}.png" for i in range(3)
    ]
    with open(synthetic / "selection.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(set(r["kept"].split("+")) == {"dcgan", "wgan_gp"} for r in rows)


def test_translation_defocus_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys

    monkeypatch.setattr(
        sys, "argv", ["translation_defocus.py", str(tmp_path), "--epochs", "1", "--size", "16"]
    )
    runpy.run_path(str(EXAMPLES / "translation_defocus.py"), run_name="__main__")
    restored = sorted(p.name for p in (tmp_path / "test" / "restored").glob("*.png"))
    assert restored == [f"{i:03d}.png" for i in range(4)]
    for name in ("defocused", "restored"):
        metrics = json.loads((tmp_path / "test" / f"metrics_{name}.json").read_text())
        assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1


def test_exact_tiled_translation_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(sys, "argv", ["exact_tiled_translation.py", str(tmp_path), "--size", "16"])
    runpy.run_path(str(EXAMPLES / "exact_tiled_translation.py"), run_name="__main__")
    out = capsys.readouterr().out
    exact = float(out.split("layer-by-layer tiles vs whole image: max difference")[1].split(",")[0])
    blended = float(out.split("blended tiles vs whole image: max difference")[1].split(",")[0])
    assert exact < 1e-5 < blended
    assert (tmp_path / "translated" / "slice.png").is_file()
    assert list((tmp_path / "offload").iterdir()) == []


def test_diffusion_samplers_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    argv = ["diffusion_samplers.py", "--steps", "20", "--size", "8", "--ddpm-steps", "20"]
    argv += ["--fast-steps", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared CPU
    try:
        runpy.run_path(str(EXAMPLES / "diffusion_samplers.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    errors = {}
    for line in out.splitlines():
        if line.strip().startswith("steps 100:"):
            parts = line.split()
            errors = {"ddim": float(parts[3]), "dpmpp_2m": float(parts[5])}
    assert errors["dpmpp_2m"] < errors["ddim"] / 10  # second order on the exact toy
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        assert f"{sampler}" in out and "(8, 1, 8, 8)" in out
    kept = float(out.split("max |out - known| = ")[1].split()[0])
    assert kept == 0.0


def test_latent_cache_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(sys, "argv", ["latent_cache.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "latent_cache.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "scale factor:" in out
    assert float(out.split("scaled training latents: std")[1].split()[0]) == pytest.approx(1.0)
    assert (tmp_path / "latents" / "latents.json").is_file()
    assert len(list((tmp_path / "latents" / "train").glob("*.npy"))) == 8
    # the layer-by-layer decoding is whole decoding up to float rounding
    assert (
        float(out.split("layer-by-layer tiles vs whole decoding: max difference")[1].split()[0])
        < 1e-5
    )
    assert list((tmp_path / "offload").iterdir()) == []


def test_finetune_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(
        sys,
        "argv",
        ["finetune.py", str(tmp_path), "--epochs", "1", "--size", "16", "--length", "8"],
    )
    runpy.run_path(str(EXAMPLES / "finetune.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "0 missing" in out
    after = float(out.split("after: ")[1].split()[0])
    adapter = float(out.split("adapter on its base: ")[1].split()[0])
    assert abs(after - adapter) < 1e-3  # the adapter on its base is the merged export
    assert (tmp_path / "finetuned" / "adapter" / "adapter.safetensors").is_file()
    import medgen

    # the LoRA run's checkpoint loads too (adapters re-added, EMA weights, merged)
    from_ckpt = medgen.load(tmp_path / "finetuned" / "checkpoints" / "last.ckpt")
    exported = medgen.load(tmp_path / "finetuned" / "model")
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(from_ckpt.reconstruct(x), exported.reconstruct(x))


def test_stylegan2_small_data_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(
        sys, "argv", ["stylegan2_small_data.py", str(tmp_path), "--steps", "3", "--images", "16"]
    )
    runpy.run_path(str(EXAMPLES / "stylegan2_small_data.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "ada p = " in out and "final ada p:" in out
    for psi in ("1.0", "0.7"):
        assert len(list((tmp_path / f"samples_psi{psi}").glob("*.png"))) == 4
