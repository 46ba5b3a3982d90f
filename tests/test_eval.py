"""medgen-eval end to end: on phantoms (2D) and on the MNI152 template (3D) one command writes the
report with the four families of measures from local random-weight extractors; units are brought
together or refused; a run's samples/ folder evaluates as is; medgen-sample audit_against=DIR; the
FidelityMonitor callback during training."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import medgen.api
from medgen.callbacks import FidelityMonitor
from medgen.data.io import MedgenIOError, write
from medgen.data.phantoms import head_phantom
from medgen.features import MedicalNetResNet
from medgen.metrics import evaluate_generation

pytestmark = pytest.mark.usefixtures("single_thread")


def _png(x, path):
    write(x.clamp(0, 1), path, value_range=(0.0, 1.0), bit_depth=16)


@pytest.fixture(scope="module")
def phantom_folders(tmp_path_factory):
    """train (20), held-out real (12), fake (12 independent + 3 planted copies), labelled sets."""
    root = tmp_path_factory.mktemp("phantoms")
    train = [head_phantom(2, 32, index=i) for i in range(20)]
    for i, x in enumerate(train):
        _png(x, root / "train" / f"train_{i:02d}.png")
    for i in range(12):
        _png(head_phantom(2, 32, index=100 + i), root / "real" / f"real_{i:02d}.png")
        _png(head_phantom(2, 32, index=200 + i), root / "fake" / f"gen_{i:02d}.png")
    _png(train[4], root / "fake" / "gen_copy.png")
    _png(train[6].flip(-1), root / "fake" / "gen_flip.png")
    _png(train[8].roll((1, 2), dims=(1, 2)), root / "fake" / "gen_shift.png")
    for name, start in (("u_train", 300), ("u_syn", 400), ("u_test", 500)):
        for i in range(start, start + 10):
            contrast = "t1" if i % 2 else "t2"
            _png(
                head_phantom(2, 16, index=i, contrast=contrast), root / name / contrast / f"{i}.png"
            )
    return root


def test_medgen_eval_report_2d_all_four_families(phantom_folders, tmp_path):
    root = phantom_folders
    report = tmp_path / "report"
    overrides = [
        f"real={root / 'real'}",
        f"fake={root / 'fake'}",
        f"train={root / 'train'}",
        "feature_extractors=[random_conv,pixels]",
        "audit=true",
        f"report_dir={report}",
        f"cache_dir={tmp_path / 'cache'}",
        f"output={tmp_path / 'metrics.json'}",
        "n_boot=20",
        f"utility={{task: classification, real_train: {root / 'u_train'}, synthetic: "
        f"{root / 'u_syn'}, real_test: {root / 'u_test'}, steps: 20, n_boot: 20}}",
    ]
    cfg = medgen.api.compose("eval", overrides)
    result = medgen.api.evaluate(cfg)
    assert {p.name for p in report.iterdir()} >= {
        "report.md",
        "report.json",
        "metrics.png",
        "samples.png",
        "real.png",
        "histograms.png",
        "nearest_pairs.png",
    }
    written = json.loads((report / "report.json").read_text())
    assert json.loads((tmp_path / "metrics.json").read_text())["fid"] == pytest.approx(
        result["fid"]
    )
    # fidelity and diversity, per extractor, with intervals and comparability records
    rc = written["fidelity"]["random_conv"]
    assert rc["protocol_name"] == "2d" and rc["weights"] is None
    for metric in ("fd", "precision", "recall", "density", "coverage"):
        stat = rc["all"][metric]
        assert stat["ci_low"] <= stat["ci_high"] and stat["n_boot"] > 0
    assert written["n_real"] == 12 and written["n_fake"] == 15
    assert 0 < written["diversity"]["fake"]["mean"] < 1
    # memorisation: exactly the planted copies
    assert sorted(written["audit"]["flagged_files"]) == [
        "gen_copy.png",
        "gen_flip.png",
        "gen_shift.png",
    ]
    top = {t["sample"]: t["train"] for t in written["audit"]["top_k"][:3]}
    assert top == {
        "gen_copy.png": "train_04.png",
        "gen_flip.png": "train_06.png",
        "gen_shift.png": "train_08.png",
    }
    # utility: three regimes on held-out real data
    assert written["utility"]["real"]["value"] > 0.9
    markdown = (report / "report.md").read_text()
    assert "| memorisation | copy rate |" in markdown and "utility" in markdown
    assert "![nearest_pairs](nearest_pairs.png)" in markdown
    # the real set's features come from the cache the second time
    again = evaluate_generation(
        root / "real",
        root / "fake",
        feature_extractors=["random_conv"],
        n_boot=0,
        cache_dir=tmp_path / "cache",
    )
    assert again["cache"]["hits"] == 1
    assert again["fidelity"]["random_conv"]["all"]["fd"]["value"] == pytest.approx(
        rc["all"]["fd"]["value"]
    )


def _mni_volumes(count: int, scale: float, seed: int, size: int = 16) -> list[torch.Tensor]:
    from nilearn.datasets import load_mni152_template

    template = torch.from_numpy(load_mni152_template(resolution=2).get_fdata()).float()
    base = torch.nn.functional.adaptive_avg_pool3d(template[None, None], size)[0]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        shift = tuple(int(s) for s in torch.randint(-1, 2, (3,), generator=g))
        v = base.roll(shift, dims=(1, 2, 3)) * (1 + 0.1 * torch.rand(1, generator=g))
        out.append((v + 0.02 * torch.randn(v.shape, generator=g)).clamp(min=0) * scale)
    return out


@pytest.fixture(scope="module")
def mni_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mni")
    for i, v in enumerate(_mni_volumes(6, 1000.0, 0)):  # "scanner units"
        write(v, root / "real" / f"r{i}.nii.gz")
    for i, v in enumerate(_mni_volumes(6, 1.0, 1)):  # model units, ~[-1, 1]
        write(v * 2 - 1, root / "fake" / f"f{i}.nii.gz")
    # labelled volumes for the utility (segmentation of the brain: intensity above 0.3)
    for name, seed in (("seg_train", 2), ("seg_syn", 3), ("seg_test", 4)):
        for i, v in enumerate(_mni_volumes(4, 1.0, seed)):
            write(v, root / name / "images" / f"v{i}.nii.gz")
            write((v > 0.3).float(), root / name / "labels" / f"v{i}.nii.gz")
    torch.manual_seed(0)
    torch.save(
        {f"module.{k}": v for k, v in MedicalNetResNet(10, "B").state_dict().items()},
        root / "resnet_10.pth",
    )
    return root


def test_mni_3d_units_refused_then_brought_together_and_all_four_families(mni_folders, tmp_path):
    root = mni_folders
    with pytest.raises(
        MedgenIOError,
        match=r"r0.nii.gz: float values in .* \(real=...\), not \[0, 1\]; pass data_range=R",
    ):
        evaluate_generation(root / "real", root / "fake")
    with pytest.raises(MedgenIOError, match="not in the same units.*real_preset=NAME") as info:
        evaluate_generation(root / "real", root / "fake", data_range=2.0)
    assert "allow_range_mismatch=true" in str(info.value)
    mr = {"name": "mr", "lower": 0.0, "upper": 100.0}  # MR units -> [-1, 1]
    result = evaluate_generation(
        root / "real",
        root / "fake",
        train=root / "real",
        real_preset=mr,
        feature_extractors=["medicalnet"],
        weights={"medicalnet": str(root / "resnet_10.pth")},
        n_boot=5,
        k=3,
        audit=True,
        utility={
            "task": "segmentation",
            "real_train": str(root / "seg_train"),
            "synthetic": str(root / "seg_syn"),
            "real_test": str(root / "seg_test"),
            "steps": 5,
            "n_boot": 10,
        },
        report_dir=tmp_path / "report",
    )
    assert result["utility"]["metric"] == "dice" and result["utility"]["n_test"] == 4
    assert all(0 <= result["utility"][r]["value"] <= 1 for r in ("real", "synthetic"))
    assert result["units"]["value_range"] == [-1.0, 1.0] and "warning" not in result["units"]
    med = result["fidelity"]["medicalnet"]
    assert med["protocol_name"] == "3d" and med["all"]["features"] == 512
    assert med["weights"] == "resnet_10.pth" and len(med["weights_sha256"]) == 64
    assert any("singular" in w for w in result["warnings"])  # 6 volumes for 512 features
    assert result["audit"]["baseline"].startswith("leave-one-out")
    assert (tmp_path / "report" / "orthogonal.png").is_file()
    # 2.5D: slices along the three axes, the central half of each
    planes = evaluate_generation(
        root / "real",
        root / "fake",
        real_preset=mr,
        feature_extractors=["pixels"],
        protocol="2.5d",
        center_ratio=0.5,
        n_boot=0,
        report_dir=tmp_path / "report25",
    )["fidelity"]["pixels"]
    assert "pixels / 2.5d / mean of planes" in (tmp_path / "report25" / "report.md").read_text()
    assert planes["protocol_name"] == "2.5d" and "r=0.5" in planes["protocol"]
    assert planes["axis0"]["n_real"] == 6 * 8  # the central 8 of 16 slices of each volume
    assert planes["mean_over_planes"]["fd"] == pytest.approx(
        np.mean([planes[a]["fd"]["value"] for a in ("axis0", "axis1", "axis2")])
    )
    with pytest.raises(ValueError, match=r"resnet_10.pth: SHA-256 mismatch: expected f{64}"):
        evaluate_generation(
            root / "real",
            root / "fake",
            value_range=[0, 1],
            normalize="minmax",
            feature_extractors=["medicalnet"],
            weights={"medicalnet": str(root / "resnet_10.pth")},
            sha256={"medicalnet": "f" * 64},
        )


def test_run_samples_folder_with_png_grids_evaluates_as_volumes(tmp_path):
    samples = tmp_path / "samples"
    for i in range(4):
        write(head_phantom(3, 12, index=i), samples / f"epoch0001_samples_{i:02d}.nii.gz")
        write(head_phantom(3, 12, index=10 + i), tmp_path / "real" / f"r{i}.nii.gz")
    _png(torch.rand(1, 40, 60), samples / "epoch0001_samples.png")  # the preview grid
    result = evaluate_generation(
        tmp_path / "real", samples, feature_extractors=["pixels"], n_boot=0
    )
    assert result["n_fake"] == 4 and result["spatial_dims"] == 3
    assert any("1 PNG file(s) beside 4 NIfTI volume(s) ignored" in n for n in result["notes"])


def test_cli_bad_input_prints_the_message_not_a_traceback(mni_folders, monkeypatch, capsys):
    from medgen import cli

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "medgen-eval",
            f"real={mni_folders / 'real'}",
            f"fake={mni_folders / 'fake'}",
            "output=null",
        ],
    )
    with pytest.raises(SystemExit) as info:
        cli.eval_main()
    assert str(info.value).startswith("medgen-eval: ") and "data_range=R" in str(info.value)


def _tiny_gan():
    from medgen.models import GAN

    torch.manual_seed(0)
    return GAN(
        generator={
            "_target_": "medgen.nets.DCGANGenerator",
            "latent_dim": 8,
            "image_size": 16,
            "channels": [16, 8],
        },
        discriminator={
            "_target_": "medgen.nets.DCGANDiscriminator",
            "image_size": 16,
            "channels": [8, 16],
        },
        spatial_dims=2,
    )


@pytest.mark.parametrize("action", ["refuse", "mark"])
def test_medgen_sample_audit_against_training_images(tmp_path, action):
    from medgen.data.outputs import write_images

    model = _tiny_gan()
    model.save_pretrained(tmp_path / "model")
    drawn = model.sample(6, seed=3, batch_size=6)
    # the training folder holds phantoms and exact copies of samples 1 and 4
    train = tmp_path / "train"
    for i in range(12):
        _png(head_phantom(2, 16, index=i), train / f"p{i:02d}.png")
    write_images(model, drawn[[1, 4]], train, prefix="copy")
    cfg = medgen.api.compose(
        "sample",
        [
            f"checkpoint={tmp_path / 'model'}",
            "num_samples=6",
            "seed=3",
            f"output_dir={tmp_path / 'out'}",
            f"audit_against={train}",
            f"audit_action={action}",
        ],
    )
    paths = medgen.runs.sample(cfg)
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["flagged"] == [1, 4] and audit["action"] == action
    assert audit["nearest_training_file"] == {"1": "copy_0000.png", "4": "copy_0001.png"}
    names = sorted(p.name for p in paths)
    if action == "refuse":
        assert len(paths) == 4 and not any("flagged" in n for n in names)
    else:
        assert names[1] == "sample_0001_flagged.png" and names[4] == "sample_0004_flagged.png"


def test_fidelity_monitor_logs_a_synced_fd_every_epoch():
    from medgen.utils.instantiate import instantiate
    from tests.helpers import cpu_trainer, cycled_loader, phantom_images

    cfg = medgen.api.compose("train", ["callbacks=fidelity"]).callbacks.fidelity
    assert cfg._target_ == "medgen.callbacks.FidelityMonitor"
    monitor = instantiate({**cfg, "every_n_epochs": 1, "num_real": 8, "num_samples": 8})
    assert isinstance(monitor, FidelityMonitor)
    model = _tiny_gan()
    loader = cycled_loader(phantom_images(2, 16, 8), 8, 4)
    trainer = cpu_trainer(
        max_epochs=2, limit_train_batches=1, limit_val_batches=2, callbacks=[monitor]
    )
    trainer.fit(model, loader, loader)
    assert [epoch for epoch, _ in monitor.history] == [0, 1]
    assert all(np.isfinite(v) and v > 0 for _, v in monitor.history)
    assert float(trainer.callback_metrics["val/fd_random_conv"]) == pytest.approx(
        monitor.history[-1][1]
    )
    assert int(monitor.metric.real_n) == 8  # the real statistics are collected once


def test_preset_from_a_model_without_a_recorded_preset_names_the_alternative(tmp_path):
    from medgen.runs.evaluation import preset_of_checkpoint

    _tiny_gan().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"records no intensity preset; pass real_preset=NAME"):
        preset_of_checkpoint(str(tmp_path / "model"))


class _FidelityDump(FidelityMonitor):
    """FidelityMonitor that saves each rank's logged values at the end of training."""

    def __init__(self, folder: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        from pathlib import Path

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        state = {
            "history": torch.tensor([v for _, v in self.history]),
            "real_n": self.metric.real_n,
        }
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_fidelity_monitor_under_ddp_logs_one_value_on_both_ranks(tmp_path):
    from medgen.utils.targets import register_target
    from tests.conftest import tiny_overrides

    register_target(_FidelityDump, "tests.test_eval._FidelityDump")
    dump = tmp_path / "fd"
    overrides = [
        *tiny_overrides(tmp_path / "run", "dcgan"),
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "data.batch_size=2",
        "++trainer.limit_val_batches=2",
        "num_samples=0",
        "export=false",
        "~callbacks.image_logger",
        "+callbacks.fd._target_=tests.test_eval._FidelityDump",
        f"+callbacks.fd.folder={dump}",
        "+callbacks.fd.every_n_epochs=1",
        "+callbacks.fd.num_real=4",
        "+callbacks.fd.num_samples=4",
    ]
    medgen.train(medgen.compose("train", overrides))
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["history"]) == 2
    torch.testing.assert_close(ranks[0]["history"], ranks[1]["history"])  # synced over ranks
    # each rank holds its share of the real images (2 of 4); compute() sums the shares
    assert int(ranks[0]["real_n"]) == int(ranks[1]["real_n"]) == 2
