"""Pix2Pix and CycleGAN: loss formulas, GAN modes, 2D/3D, LR policies, deterministic and tiled
translation, file translation that keeps dtype and geometry, and the experiments."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medgen
from medgen.data.io import MedgenIOError, read, write
from medgen.data.phantoms import PairedPhantomDataset
from medgen.inference import translate_files
from medgen.losses import PyramidL1Loss
from medgen.models import CycleGAN, Pix2Pix
from medgen.utils.schedulers import LinearDecay, lr_policy
from tests.helpers import cpu_trainer, cycled_loader


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


G = {"_target_": "medgen.nets.ResnetGenerator", "ngf": 4, "n_blocks": 1}
D = {"_target_": "medgen.nets.NLayerDiscriminator", "ndf": 4, "n_layers": 2}


@functools.cache
def _pairs(spatial_dims: int, size: int, pair: str = "defocus", count: int = 8):
    data = PairedPhantomDataset(spatial_dims, size=size, length=count, pair=pair, seed=3)
    return tuple((d["a"], d["b"]) for d in data)


def _loader(spatial_dims=2, size=16, length=8, batch=4, pair="defocus"):
    return cycled_loader(
        _pairs(spatial_dims, size, pair), length, batch, lambda i, ab: {"a": ab[0], "b": ab[1]}
    )


class _Scale(nn.Module):
    """A generator that multiplies its input by a fixed factor (known cycle/identity losses)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(float(factor)))

    def forward(self, x):
        return x * self.factor


# ------------------------------------------------------------------------------------ formulas
def test_pix2pix_losses_match_their_formulas():
    torch.manual_seed(0)
    model = Pix2Pix(generator=G, discriminator=D, lambda_l1=100.0)
    a, b = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    fake = model.generator(a)
    d = model.discriminator_loss(a, b, fake)
    real_logits = model.discriminator(torch.cat([a, b], 1))
    fake_logits = model.discriminator(torch.cat([a, fake], 1))
    expected_d = 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    torch.testing.assert_close(d["d_loss"], expected_d)
    g = model.generator_loss(a, b, fake)
    expected_g = F.softplus(-fake_logits).mean() + 100.0 * (fake - b).abs().mean()
    torch.testing.assert_close(g["g_loss"], expected_g)

    pyramid = Pix2Pix(
        generator=G, discriminator=D, reconstruction="pyramid", pyramid={"num_levels": 3}
    )
    torch.testing.assert_close(
        pyramid.reconstruction_loss(fake, b), PyramidL1Loss(2, num_levels=3)(fake, b)
    )
    lsgan = Pix2Pix(generator=G, discriminator=D, gan_mode="lsgan")
    lsgan.discriminator.load_state_dict(model.discriminator.state_dict())
    expected = 0.5 * ((real_logits - 1).square().mean() + fake_logits.square().mean())
    torch.testing.assert_close(lsgan.discriminator_loss(a, b, fake)["d_loss"], expected)


def test_cycle_and_identity_losses_are_right():
    model = CycleGAN(generator=G, discriminator=D, lambda_a=10.0, lambda_b=5.0)
    model.generator_ab, model.generator_ba = _Scale(2.0), _Scale(0.25)
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    terms, fake_a, fake_b = model.generator_loss(a, b)
    torch.testing.assert_close(fake_b, 2 * a)
    torch.testing.assert_close(fake_a, 0.25 * b)
    torch.testing.assert_close(terms["cycle_a"], (0.5 * a - a).abs().mean())  # G_ba(G_ab(a))
    torch.testing.assert_close(terms["cycle_b"], (0.5 * b - b).abs().mean())
    torch.testing.assert_close(terms["idt_b"], (2 * b - b).abs().mean())  # G_ab(b) vs b
    torch.testing.assert_close(terms["idt_a"], (0.25 * a - a).abs().mean())
    adv = model._gen_adv(model.discriminator_b, 2 * a) + model._gen_adv(
        model.discriminator_a, 0.25 * b
    )
    expected = (
        adv
        + 10.0 * terms["cycle_a"]
        + 5.0 * terms["cycle_b"]
        + 0.5 * (5.0 * terms["idt_b"] + 10.0 * terms["idt_a"])
    )
    torch.testing.assert_close(terms["g_loss"], expected)
    # The discriminator loss is halved, as in CycleGAN.
    d = model.discriminator_loss(model.discriminator_a, a, fake_a)
    torch.testing.assert_close(d["d_loss"], 0.5 * (d["d_real"] + d["d_fake"]))


def test_bad_settings_are_refused_clearly():
    with pytest.raises(ValueError, match="batch norm"):
        Pix2Pix(generator=G, discriminator=D, gan_mode="wgangp")  # PatchGAN default: batch norm
    with pytest.raises(ValueError, match="unknown gan_mode"):
        Pix2Pix(generator=G, discriminator=D, gan_mode="bce")
    with pytest.raises(ValueError, match="lambda_identity"):
        CycleGAN(generator=G, discriminator=D, in_channels=1, out_channels=3)
    CycleGAN(generator=G, discriminator=D, in_channels=1, out_channels=3, lambda_identity=0)
    model = Pix2Pix(generator=G, discriminator=D, in_channels=3)
    with pytest.raises(ValueError, match=r"source batch has shape \(4, 1, 16, 16\)"):
        cpu_trainer(max_epochs=1, limit_train_batches=1).fit(model, _loader())


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("gan_mode", ["vanilla", "lsgan", "wgangp", "hinge"])
@pytest.mark.parametrize("cls", [Pix2Pix, CycleGAN])
def test_every_gan_mode_trains_a_step(cls, gan_mode):
    d = {**D, "norm": "instance"} if gan_mode == "wgangp" else D
    model = cls(generator=G, discriminator=d, gan_mode=gan_mode)
    nets = {name: net for name, net in model.named_children() if name.startswith(("gen", "dis"))}
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in nets.items()}
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, _loader(), _loader())
    assert int(model.generator_steps) == 2
    for name, net in nets.items():  # every generator and discriminator was updated
        changed = [
            not torch.equal(x, y) for x, y in zip(before[name], net.parameters(), strict=True)
        ]
        assert sum(changed) >= len(changed) // 2, name
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/g_loss"]) and "val/psnr" in metrics
    if gan_mode == "wgangp":
        assert any(k.endswith("gp") for k in metrics)


@pytest.mark.parametrize("cls", [Pix2Pix, CycleGAN])
def test_3d_models_train_and_translate(cls):
    model = cls(generator=G, discriminator={**D, "n_layers": 1}, spatial_dims=3)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, _loader(3, 8, length=2, batch=2), _loader(3, 8, length=2, batch=2))
    assert int(model.generator_steps) == 1
    x = torch.rand(1, 1, 10, 9, 7)  # not a multiple of the generator's factor 4
    y = model.translate(x, tile=None)
    assert y.shape == x.shape and y.dtype == torch.float32
    if cls is CycleGAN:
        assert model.translate(x, direction="b2a", tile=None).shape == x.shape


def test_cyclegan_pools_fill_and_travel_with_the_checkpoint(tmp_path):
    model = CycleGAN(generator=G, discriminator=D, pool_size=6)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(model, _loader(length=12))
    assert len(model.pool_a) == len(model.pool_b) == 6
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    loaded = medgen.load(tmp_path / "c.ckpt")
    assert isinstance(loaded, CycleGAN)
    for mine, theirs in zip(model.pool_a.images, loaded.pool_a.images, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_pix2pix_learns_to_remove_defocus():
    torch.manual_seed(0)
    generator = {"_target_": "medgen.nets.UnetGenerator", "num_downs": 4, "ngf": 8}
    model = Pix2Pix(
        generator=generator,
        discriminator=D,
        lambda_l1=100.0,
        optimizer_g={"_target_": "torch.optim.Adam", "lr": 2e-3, "betas": [0.5, 0.999]},
    )
    val = torch.stack([a for a, _ in _pairs(2, 32)]), torch.stack([b for _, b in _pairs(2, 32)])

    def error() -> float:
        return float((model.translate(val[0], tile=None) - val[1]).abs().mean())

    start = error()
    trainer = cpu_trainer(max_epochs=4, limit_val_batches=0)
    trainer.fit(model, _loader(2, 32, length=40, batch=4))
    blurred = float((val[0] - val[1]).abs().mean())
    assert error() < 0.5 * start
    assert error() < blurred * 1.5  # close to (or better than) the input after 40 steps


# ------------------------------------------------------------------------------------ lr policies
def test_lr_policies_follow_their_formulas():
    def rates(policy, epochs, metric=None, **kwargs):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = lr_policy(opt, policy, **kwargs)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            scheduler.step(metric) if metric is not None else scheduler.step()
        return out

    linear = rates("linear", 6, n_epochs=2, n_epochs_decay=3)
    assert linear == pytest.approx([1, 1, 0.75, 0.5, 0.25, 0.0])
    assert LinearDecay(2, 3)(4) == pytest.approx(1 - 3 / 4)
    assert rates("step", 5, step_size=2, gamma=0.1) == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cosine = rates("cosine", 3, n_epochs=4)
    assert cosine == pytest.approx([1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5])
    plateau = rates("plateau", 4, metric=1.0, plateau_patience=1)
    assert plateau == pytest.approx([1, 1, 1, 0.2])
    assert rates("constant", 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="unknown lr policy"):
        rates("exp", 1)


def test_linear_policy_steps_once_per_epoch_in_training():
    scheduler = {
        "_target_": "medgen.utils.schedulers.lr_policy",
        "policy": "linear",
        "n_epochs": 1,
        "n_epochs_decay": 3,
    }
    model = Pix2Pix(generator=G, discriminator=D, scheduler=scheduler)
    trainer = cpu_trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, _loader())
    opt_g, opt_d = model.optimizers()
    # after 3 epochs: factor 1 - (3 + 1 - 1) / 4
    assert opt_g.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.25)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.25)


# ------------------------------------------------------------------------------------ inference
def _bn_model(**kwargs) -> Pix2Pix:
    torch.manual_seed(0)
    generator = {**G, "norm": "batch", "use_dropout": True}
    model = Pix2Pix(generator=generator, discriminator=D, **kwargs)
    model.generator.train()
    with torch.no_grad():  # give batch norm non-trivial running statistics
        for _ in range(3):
            model.generator(torch.randn(2, 1, 16, 16))
    return model


def test_translation_is_deterministic_and_leaves_the_model_unchanged():
    model = _bn_model()
    x = torch.rand(2, 1, 20, 24)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = model.translate(x, tile=None), model.translate(x, tile=None)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    stochastic = model.translate(x, tile=None, deterministic=False)  # the reference test mode
    assert not torch.allclose(first, stochastic)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert model.generator.training  # the mode is restored


def test_tiled_translation_equals_whole_image_in_the_interior():
    model = _bn_model(value_range=(-1000.0, 3000.0))
    x = torch.rand(1, 1, 96, 80) * 4000 - 1000
    whole = model.translate(x, tile=None)
    tiled = model.translate(x, tile=48, overlap=0.5, margin=12)
    assert tiled.shape == whole.shape
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    error = (tiled - whole)[interior].abs().max() / 4000
    assert error < 1e-3
    # A tile covering the image is exactly the whole-image translation.
    torch.testing.assert_close(model.translate(x, tile=128), whole, rtol=0, atol=0)


def _saved_model(tmp_path, spatial_dims=2, in_channels=1, value_range=(0.0, 1.0)):
    model = Pix2Pix(
        generator={**G, "norm": "batch"},
        discriminator=D,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=in_channels,
        value_range=value_range,
    )
    model.save_pretrained(tmp_path / "model")
    return medgen.load(tmp_path / "model")


def test_files_keep_size_dtype_bit_depth_and_affine(tmp_path):
    model = _saved_model(tmp_path)
    src = tmp_path / "in"
    rng = np.random.default_rng(0)
    write(rng.integers(0, 255, (1, 30, 21), dtype=np.uint8), src / "eight.png")
    write(rng.integers(0, 65535, (1, 17, 33), dtype=np.uint16), src / "sixteen.png")
    paths = translate_files(model, src, tmp_path / "out")
    assert [p.name for p in paths] == ["eight.png", "sixteen.png"]
    eight, sixteen = read(paths[0]), read(paths[1])
    assert eight.meta["source_dtype"] == "uint8" and eight.shape == (1, 30, 21)
    assert sixteen.meta["source_dtype"] == "uint16" and sixteen.shape == (1, 17, 33)
    # The output is the model's translation of the scaled input, scaled back to the file's range.
    x = read(src / "sixteen.png").float() / 65535
    expected = np.rint(model.translate(x, tile=None).clamp(0, 1).numpy() * 65535)
    assert np.abs(sixteen.numpy().astype(np.float64) - expected).max() <= 1

    model3d = _saved_model(tmp_path / "3d", spatial_dims=3, value_range=(-1000.0, 1000.0))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    ct = rng.integers(-1000, 1000, (1, 12, 10, 9)).astype(np.int16)
    write(ct, tmp_path / "vol" / "ct.nii.gz", affine=affine)
    write(ct.astype(np.float32), tmp_path / "vol" / "mr.nii.gz", affine=affine)
    out = translate_files(model3d, tmp_path / "vol", tmp_path / "vol_out", tile=8, overlap=0.5)
    for path, dtype in zip(out, ("int16", "float32"), strict=True):
        image = read(path)
        assert image.meta["source_dtype"] == dtype and image.shape == (1, 12, 10, 9)
        np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-6)


def test_a_corrupt_file_is_reported_and_the_rest_translated(tmp_path):
    model = _saved_model(tmp_path)
    src = tmp_path / "in"
    write(np.zeros((1, 16, 16), dtype=np.uint8), src / "a.png")
    (src / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write(np.zeros((3, 16, 16), dtype=np.uint8), src / "c_rgb.png")
    write(np.zeros((1, 16, 16), dtype=np.uint8), src / "d.png")
    with pytest.raises(MedgenIOError) as info:
        translate_files(model, src, tmp_path / "out")
    message = str(info.value)
    assert "translated 2 of 4" in message
    assert "b_corrupt.png" in message and "c_rgb.png: 3 channel(s)" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "d.png"]
    with pytest.raises(MedgenIOError, match="output folder is the input folder"):
        translate_files(model, src, src)


def test_medgen_sample_translates_from_a_checkpoint(tmp_path):
    _saved_model(tmp_path)
    write(np.full((1, 16, 16), 100, dtype=np.uint8), tmp_path / "in" / "x.png")
    cfg = medgen.compose(
        "sample",
        [
            f"checkpoint={tmp_path / 'model'}",
            f"input={tmp_path / 'in'}",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    paths = medgen.sample(cfg)
    assert [p.name for p in paths] == ["x.png"]
    cfg = medgen.compose("sample", [f"checkpoint={tmp_path / 'model'}", "output_dir=o"])
    with pytest.raises(medgen.CheckpointError, match="give input="):
        medgen.sample(cfg)


# ------------------------------------------------------------------------------------ experiments
@pytest.mark.parametrize(
    ("experiment", "overrides"),
    [
        ("pix2pix", ["model.generator.num_downs=4"]),
        ("cyclegan", ["model.generator.n_blocks=1"]),
        ("pyramid_pix2pix_bci", ["model.generator.ngf=4", "model.generator.n_blocks=1"]),
        ("comi_cyclegan", ["model.generator.ngf=4", "model.generator.n_blocks=1"]),
        (
            "pix2pix_3d",
            ["model.generator.num_downs=3", "data.train.size=8", "model.discriminator.n_layers=1"],
        ),
    ],
)
def test_experiments_train_export_and_translate(experiment, overrides, tiny, tmp_path):
    cfg = medgen.compose(
        "train",
        [
            *tiny(experiment),
            f"data.train.size={32 if experiment.endswith(('bci', 'comi_cyclegan')) else 16}",
            "data.train.length=4",
            "data.val.length=2",
            "data.batch_size=2",
            "++trainer.limit_train_batches=2",
            "~callbacks.image_logger",
            *overrides,
        ],
    )
    result = medgen.train(cfg)
    assert "val/psnr" in result["metrics"]
    model = medgen.load(result["model_dir"])
    channels = model.in_channels
    size = (16,) * model.spatial_dims if experiment != "pix2pix_3d" else (8, 8, 8)
    if experiment.endswith(("bci", "comi_cyclegan")):
        size = (32, 32)
    x = torch.rand(1, channels, *size)
    assert model.translate(x).shape == x.shape
    checkpoint = medgen.load(result["checkpoint"])
    torch.testing.assert_close(checkpoint.translate(x), model.translate(x))


@pytest.mark.parametrize(
    ("experiment", "data", "keys"),
    [
        ("pix2pix", "paired_folder", ("data.train.a_dir", "data.train.b_dir")),
        ("cyclegan", "unpaired_folder", ("data.train.a_source", "data.train.b_source")),
    ],
)
def test_experiments_train_on_image_folders(experiment, data, keys, tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        for i in range(4):
            image = rng.integers(0, 255, (1, 16, 16), dtype=np.uint8)
            write(image, tmp_path / folder / f"img{i}.png")
    cfg = medgen.compose(
        "train",
        [
            f"experiment={experiment}",
            f"data={data}",
            f"{keys[0]}={tmp_path / 'a'}",
            f"{keys[1]}={tmp_path / 'b'}",
            f"paths.output_dir={tmp_path / 'run'}",
            "data.batch_size=2",
            "trainer.max_epochs=1",
            "~callbacks.progress_bar",
            "~callbacks.image_logger",
            "model.generator.ngf=4",
            "model.discriminator.n_layers=1",
            *(["model.generator.num_downs=4"] if experiment == "pix2pix" else []),
            *(["model.generator.n_blocks=1"] if experiment == "cyclegan" else []),
        ],
    )
    result = medgen.train(cfg)
    assert int(medgen.load(result["checkpoint"]).generator_steps) == 2  # 4 images, batch 2
    model = medgen.load(result["model_dir"])
    assert model.value_range == (-1.0, 1.0)
    out = translate_files(model, tmp_path / "a", tmp_path / "translated")
    assert [read(p).meta["source_dtype"] for p in out] == ["uint8"] * 4
