"""The AGGrGAN model: joint training of members, aggregation, datasets, CLI and loading."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import medgen
from medgen.models import GAN, AGGrGAN
from medgen.models.aggrgan import aggregate, default_members
from tests.helpers import cpu_trainer, cycled_loader, phantom_images
from tests.test_models_gan import _nets


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SIZE = 16


def _members() -> list[dict]:
    tiny = _nets(size=SIZE)
    critic = _nets(size=SIZE, critic=True)
    return [
        {"name": "dcgan", "generator": tiny["generator"], "discriminator": tiny["discriminator"]},
        {
            "name": "dcgan_resize",
            "generator": {**tiny["generator"], "upsample": "nearest_conv"},
            "discriminator": tiny["discriminator"],
        },
        {
            "name": "wgan_gp",
            "generator": tiny["generator"],
            "discriminator": critic["discriminator"],
            "loss": "wgan",
            "gp_weight": 10.0,
            "n_critic": 2,
        },
    ]


def _model(**kwargs) -> AGGrGAN:
    torch.manual_seed(0)
    return AGGrGAN(members=_members(), ssim_kernel_size=7, **kwargs)


def _loader(length: int) -> DataLoader:
    return cycled_loader(phantom_images(2, SIZE, 32), length, 4)


def test_members_train_together_with_their_own_schedules():
    model = _model()
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model, _loader(16))
    assert model.discriminator_steps.tolist() == [4, 4, 4]
    assert model.generator_steps.tolist() == [4, 4, 2]  # the WGAN-GP member has n_critic=2
    assert trainer.global_step == 4 * 3 + 10  # every optimiser step counts in Lightning's


def test_default_members_are_two_dcgan_variants_and_a_wgan_gp():
    members = default_members()
    assert [m["name"] for m in members] == ["dcgan", "dcgan_resize", "wgan_gp"]
    assert [m["generator"]["upsample"] for m in members] == [
        "transpose",
        "nearest_conv",
        "transpose",
    ]
    assert members[2]["adv_loss"] == "wgan" and members[2]["gp_weight"] == 10.0
    model = AGGrGAN(net_defaults={"image_size": 32, "image_channels": 1})
    assert len(model.generators) == 3
    assert model.generators[0].image_size == (32, 32)


def test_invalid_configurations_are_named():
    with pytest.raises(ValueError, match="k must be between 1 and"):
        AGGrGAN(members=_members(), k=4)
    with pytest.raises(ValueError, match="unique"):
        AGGrGAN(members=[_members()[0], _members()[0]], k=1)
    with pytest.raises(ValueError, match=r"member 'dcgan': unknown keys \['lr'\]"):
        AGGrGAN(members=[{**_members()[0], "lr": 1.0}], k=1)
    bad = _members()
    bad[1]["generator"] = {**bad[1]["generator"], "image_size": 8}
    with pytest.raises(ValueError, match="same image size"):
        AGGrGAN(members=bad)
    with pytest.raises(ValueError, match="style: unknown keys"):
        AGGrGAN(members=_members(), style={"path": "x"})


def test_sample_is_the_aggregate_of_the_members_candidates():
    model = _model()
    images, selection = model.sample(5, seed=3, return_selection=True)
    assert images.shape == (5, 1, SIZE, SIZE)
    candidates = model.candidates(5, seed=3)
    assert candidates.shape == (3, 5, 1, SIZE, SIZE)
    # Member i draws with seed + i: its candidates are that member's own samples.
    torch.testing.assert_close(candidates[1], model.run_generator(model.generators[1], 5, 4, 64))
    expected, expected_sel = aggregate(candidates, k=2, sigma=2.0, kernel_size=7)
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(selection["indices"], expected_sel["indices"])
    assert selection["indices"].shape == (2, 5) and selection["scores"].shape == (3, 5)
    torch.testing.assert_close(model.sample(5, seed=3), images, rtol=0, atol=0)


def test_reference_selects_the_member_closest_to_it():
    model = _model()
    candidates = model.candidates(4, seed=0)
    # References equal to member 2's candidates: member 2 must be ranked first everywhere.
    _, selection = model.sample(4, seed=0, reference=candidates[2], return_selection=True)
    assert selection["indices"][0].tolist() == [2, 2, 2, 2]
    assert torch.allclose(selection["scores"][2], torch.ones(4))


def test_style_transfer_runs_with_local_weights_and_warns_without_style_images(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"  # random weights in torchvision's layout, a local file
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(), path)
    style = {
        "weights_path": str(path),
        "arch": "vgg16",
        "content_layers": ["relu2_2"],
        "style_layers": ["relu1_2"],
        "steps": 3,
    }
    model = _model(style=style)
    assert model.style_enabled
    with pytest.warns(UserWarning, match="no style images"):
        merged = model.sample(2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model, not at every validation
        model.sample(2, seed=0)
    reference = torch.rand(2, 1, SIZE, SIZE)
    styled = model.sample(2, seed=0, reference=reference)
    assert styled.shape == merged.shape and not torch.equal(styled, merged)
    assert styled.min() >= 0.0 and styled.max() <= 1.0


def test_missing_style_weights_name_the_file(tmp_path):
    model = _model(style={"weights_path": str(tmp_path / "vgg19.pth")})
    with pytest.raises(FileNotFoundError, match="vgg19.pth"):
        model.sample(2, seed=0, reference=torch.rand(1, 1, SIZE, SIZE))


def test_write_dataset_writes_images_and_selection_csv(tmp_path):
    model = _model()
    paths = model.write_dataset(tmp_path / "aug", 3, seed=1)
    assert [p.name for p in paths] == ["aggrgan_0000.png", "aggrgan_0001.png", "aggrgan_0002.png"]
    with open(tmp_path / "aug" / "selection.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [p.name for p in paths]
    _, selection = model.sample(3, seed=1, return_selection=True)
    for n, row in enumerate(rows):
        kept = [model.member_names[int(i)] for i in selection["indices"][:, n]]
        assert row["kept"] == "+".join(kept)
        assert float(row["ssim_wgan_gp"]) == pytest.approx(float(selection["scores"][2, n]))
    # 16-bit grey PNGs read back into the model's units.
    back = medgen.api.read_references(tmp_path / "aug", model)
    torch.testing.assert_close(back, model.sample(3, seed=1), atol=1 / 65535, rtol=0)


def test_from_generators_and_medgen_sample_cli(tmp_path):
    folders = []
    for i, member in enumerate(_members()):
        gan = GAN(
            generator=member["generator"],
            discriminator=member["discriminator"],
            loss=member.get("loss", "non_saturating"),
        )
        folders.append(gan.save_pretrained(tmp_path / f"gan{i}"))
    ensemble = AGGrGAN.from_generators(folders, names=["a", "b", "c"], ssim_kernel_size=7)
    for g, folder in zip(ensemble.generators, folders, strict=True):
        source = medgen.load(folder).generator.state_dict()
        for key, value in g.state_dict().items():
            torch.testing.assert_close(value, source[key])
    # The same through medgen-sample, with reference images from a folder.
    ref_dir = tmp_path / "refs"
    ensemble.write_dataset(ref_dir, 2, seed=9)
    (ref_dir / "selection.csv").unlink()
    cfg = medgen.compose(
        "sample",
        [
            f"generators=[{','.join(map(str, folders))}]",
            f"reference_dir={ref_dir}",
            "num_samples=3",
            f"output_dir={tmp_path / 'out'}",
            "checkpoint=unused",
        ],
    )
    paths = medgen.api.sample(cfg)
    assert len(paths) == 3 and (tmp_path / "out" / "selection.csv").is_file()


def test_experiment_trains_and_exports_every_generator(tmp_path):
    from tests.conftest import tiny_overrides

    cfg = medgen.compose("train", tiny_overrides(tmp_path, "aggrgan"))
    assert [m.name for m in cfg.model.members] == ["dcgan", "dcgan_resize", "wgan_gp"]
    result = medgen.train(cfg)
    assert "val/mmd" in result["metrics"]
    exported = medgen.load(tmp_path / "model")
    assert isinstance(exported, AGGrGAN) and len(exported.generators) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no style weights configured: no style warning either
        assert exported.sample(2, seed=0).shape == (2, 1, 64, 64)
    ckpt = medgen.load(tmp_path / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(ckpt.sample(2, seed=0), exported.sample(2, seed=0))
