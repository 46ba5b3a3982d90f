"""medgen.finetune: init_from and its report, freezing, lr groups, LoRA, adapters, config keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import medgen
from medgen.finetune import (
    FinetuneCallback,
    adapt_input_channels,
    add_lora,
    apply_finetune,
    freeze,
    has_lora,
    init_from,
    lr_param_groups,
    merge_lora,
    merged_adapters,
    save_adapter,
    setup_finetune,
)
from medgen.models import VAE
from medgen.pretrained import CheckpointError

NET = {"channels": [4, 8], "latent_channels": 2, "norm_num_groups": 2}


def make_vae(in_channels: int = 1, spatial_dims: int = 2, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(spatial_dims=spatial_dims, net={"in_channels": in_channels, **NET})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """An exported tiny 2D VAE (the weights fine-tuning starts from)."""
    folder = tmp_path_factory.mktemp("base") / "model"
    make_vae(seed=1).save_pretrained(folder)
    return folder


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- init_from
def test_init_from_export_loads_every_key_and_reports(base_dir, caplog):
    model = make_vae(seed=2)
    with caplog.at_level(logging.INFO, logger="medgen"):
        report = init_from(model, base_dir)
    assert _same(model, medgen.load(base_dir))
    assert len(report.loaded) == len(model.state_dict()) and not report.missing
    counts = report.counts()
    assert set(counts) == {"net.encoder", "net.decoder"}
    assert sum(c["loaded"] for c in counts.values()) == len(report.loaded)
    assert "net.encoder" in caplog.text and f"{len(report.loaded)} loaded" in caplog.text


def test_init_from_new_input_channels_adapts_first_conv(base_dir):
    base = medgen.load(base_dir)
    model = make_vae(in_channels=3, seed=3)
    fresh_out = model.net.decoder.conv_out.weight.detach().clone()
    report = init_from(model, base_dir)
    assert list(report.adapted) == ["net.encoder.conv_in.weight"]
    assert report.adapted["net.encoder.conv_in.weight"] == ((4, 1, 3, 3), (4, 3, 3, 3))
    # the decoder's output conv (1 -> 3 channels) keeps its fresh initialisation
    assert set(report.reinitialised) == {"net.decoder.conv_out.weight", "net.decoder.conv_out.bias"}
    assert torch.equal(model.net.decoder.conv_out.weight, fresh_out)
    # a grey image repeated over the 3 channels gives the pre-trained response
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(
        model.net.encoder.conv_in(x.repeat(1, 3, 1, 1)), base.net.encoder.conv_in(x)
    )


def test_adapt_input_channels_formula():
    w = torch.randn(5, 3, 3, 3, 3)
    torch.testing.assert_close(adapt_input_channels(w, 1), w.sum(1, keepdim=True))
    five = adapt_input_channels(w, 5)
    torch.testing.assert_close(five, torch.cat([w, w[:, :2]], 1) * 3 / 5)


def test_init_from_refusals_leave_the_model_unchanged(base_dir, tmp_path):
    model = make_vae(in_channels=3, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'net\.encoder\.conv_in\.weight' has shape"):
        init_from(model, base_dir, reinit_mismatched=False)
    with pytest.raises(CheckpointError, match="strict"):
        init_from(model, base_dir, strict=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a model"):
        init_from(model, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        init_from(model, tmp_path / "nothing")
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="junk.pt"):
        init_from(model, tmp_path / "junk.pt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_init_from_a_bare_net_state_dict_finds_the_prefix(base_dir, tmp_path):
    base = medgen.load(base_dir)
    torch.save(base.net.state_dict(), tmp_path / "net.pth")
    model = make_vae(seed=5)
    report = init_from(model, tmp_path / "net.pth")
    assert report.prefix == "net." and not report.missing
    assert _same(model, base)


def test_init_from_keeps_an_exports_recorded_latent_scale(tmp_path):
    from safetensors.torch import save_file

    class Latent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 2)
            self.register_buffer("latent_scale", torch.tensor(float("nan")))  # "auto"

    source = Latent()
    save_file(
        {f"net.{k}": v for k, v in source.net.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"init_args": {"latent_scale": 1.25, "beta": 0.5}})
    )
    model = Latent()
    report = init_from(model, tmp_path)
    assert float(model.latent_scale) == 1.25 and "latent_scale" in report.loaded
    assert not report.unexpected and not report.missing


# ----------------------------------------------------------------------------- freezing
def test_freeze_patterns_and_errors():
    model = make_vae()
    names = freeze(model, ["net.encoder.*"])
    assert names and all(n.startswith("net.encoder.") for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in names)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("net.decoder"))
    with pytest.raises(ValueError, match=r"'net\.encodr\.\*' matches no parameter"):
        freeze(model, ["net.encodr.*"], "model.finetune.freeze")


def test_lr_multipliers_reach_the_optimiser_of_every_family():
    model = make_vae()
    apply_finetune(model, lr_multipliers={"net.encoder.*": 0.1})
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    lrs = sorted(g["lr"] for g in opt.param_groups)
    base_lr = model.optimizer_config["lr"]
    assert lrs == pytest.approx([base_lr * 0.1, base_lr])
    enc = {id(p) for p in model.net.encoder.parameters()}
    slow = next(g for g in opt.param_groups if g["lr_factor"] == 0.1)
    assert {id(p) for p in slow["params"]} == enc
    # an adversarial family: the hook splits the generator's optimiser, the D's stays whole
    from medgen.utils.instantiate import instantiate, to_plain

    cfg = medgen.compose("train", ["experiment=dcgan"])
    gan = instantiate(to_plain(cfg.model), _recursive_=False)
    first = next(n for n, _ in gan.named_parameters() if n.startswith("generator."))
    apply_finetune(gan, lr_multipliers={first: 0.5})
    g_opt, d_opt = gan.configure_optimizers()[:2]
    assert sorted(grp["lr_factor"] for grp in g_opt.param_groups) == [0.5, 1.0]
    assert len(d_opt.param_groups) == 1
    with pytest.raises(ValueError, match="matches no parameter"):
        lr_param_groups(model, model.parameters(), {"nope.*": 2.0}, 1e-3)


def test_callback_keeps_frozen_batch_norm_in_eval_and_unfreezes_on_schedule():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
            self.head = nn.Sequential(nn.Conv2d(4, 1, 1), nn.BatchNorm2d(1))

    class Trainer:
        global_step = 0

    model = Tiny()
    callbacks = apply_finetune(model, freeze_patterns=["body.*"], unfreeze_at_step=3)
    (callback,) = callbacks
    assert isinstance(callback, FinetuneCallback)
    trainer = Trainer()
    model.train()
    callback.on_train_batch_start(trainer, model, None, 0)
    assert not model.body[1].training and model.head[1].training
    stats = model.body[1].running_mean.clone()
    model.body(torch.randn(2, 1, 6, 6))
    assert torch.equal(model.body[1].running_mean, stats)  # eval mode: statistics kept
    assert not any(p.requires_grad for p in model.body.parameters())
    trainer.global_step = 3
    model.train()
    callback.on_train_batch_start(trainer, model, None, 0)
    assert all(p.requires_grad for p in model.body.parameters()) and model.body[1].training


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3), nn.Conv3d(2, 3, 3)])
def test_lora_equals_peft_lora_and_merges_exactly(layer):
    import peft

    torch.manual_seed(0)
    ours = nn.Sequential(layer)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
        nn.Sequential(layer.__class__(*_layer_args(layer))),
    )
    theirs[0].base_layer.load_state_dict(layer.state_dict())
    add_lora(ours, r=2, alpha=4)
    adapter = ours[0]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "base" in n)
    with torch.no_grad():
        adapter.lora_B.normal_()
        theirs[0].lora_A["default"].weight.copy_(
            adapter.lora_A.view_as(theirs[0].lora_A["default"].weight)
        )
        theirs[0].lora_B["default"].weight.copy_(
            adapter.lora_B.view_as(theirs[0].lora_B["default"].weight)
        )
    x = torch.randn(2, *_input_shape(layer))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    expected = ours(x)
    merge_lora(ours)
    assert not has_lora(ours) and set(ours.state_dict()) == {"0.weight", "0.bias"}
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def _layer_args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels, layer.kernel_size


def _input_shape(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return (layer.in_features,)
    return (layer.in_channels,) + (6,) * (len(layer.kernel_size))


def test_lora_reaches_self_attention_projections_and_unmerges_exactly():
    from medgen.nn.attention import SelfAttention

    attn = SelfAttention(3, 8, norm_num_groups=4).eval()
    x = torch.randn(1, 8, 4, 4, 4)
    before = attn(x)
    names = add_lora(attn, r=2, target=["qkv", "proj_out"])
    assert names == ["qkv", "proj_out"]
    torch.testing.assert_close(attn(x), before)  # B = 0: starts from the pre-trained function
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    adapted = attn(x)
    assert (adapted - before).abs().max() > 1e-3  # the weights read directly see the update
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    with merged_adapters(attn):
        assert set(attn.state_dict()) == {
            "norm.weight",
            "norm.bias",
            "qkv.weight",
            "qkv.bias",
            "proj_out.weight",
            "proj_out.bias",
        }
        torch.testing.assert_close(attn(x), adapted)
    assert all(torch.equal(v, state[k]) for k, v in attn.state_dict().items())
    import pickle  # ddp_spawn pickles the model: adapted layers are importable classes

    clone = pickle.loads(pickle.dumps(attn))
    torch.testing.assert_close(clone(x), adapted)


def test_lora_rank8_trainable_fraction_on_3d_diffusion_unet():
    from medgen.nets import DiffusionUNet

    # the fraction is about r / width: <= 5% at rank 8 from 160 channels on
    def unet3d(channels: list[int], heads: int, groups: int) -> DiffusionUNet:
        return DiffusionUNet(
            3,
            1,
            1,
            channels=channels,
            attention_levels=[False, True],
            num_res_blocks=1,
            num_head_channels=heads,
            norm_num_groups=groups,
        )

    unet = unet3d([160, 320], 64, 32)
    full = sum(p.numel() for p in unet.parameters())
    layers = add_lora(unet, r=8)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert any(".attn.qkv" in n for n in layers) and any("conv1" in n for n in layers)
    assert trainable / full <= 0.05
    small = unet3d([8, 16], 8, 4)
    add_lora(small, r=2)
    small(torch.randn(1, 1, 4, 4, 4), torch.tensor([3])).square().mean().backward()
    assert all(p.grad is None for n, p in small.named_parameters() if "lora" not in n)
    assert all(p.grad is not None for n, p in small.named_parameters() if n.endswith("lora_A"))


# ----------------------------------------------------------------------------- adapters
def test_adapter_folder_loads_on_its_base_and_refuses_another(base_dir, tmp_path):
    model = make_vae(seed=6)
    init_from(model, base_dir, verbose=False)
    apply_finetune(model, lora={"r": 2}, init_from=str(base_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    model.eval()
    x = torch.rand(2, 1, 8, 8)
    expected = model.reconstruct(x)
    adapter = save_adapter(model, tmp_path / "adapter", base_dir)
    config = json.loads((adapter / "config.json").read_text())
    assert config["format"] == "medgen-adapter/1" and len(config["base"]["sha256"]) == 64
    assert config["extra_keys"] == []  # only the adapters differ from the base
    loaded = medgen.load(adapter)
    assert not has_lora(loaded)
    torch.testing.assert_close(loaded.reconstruct(x), expected, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "merged")  # merged export equals the adapter on its base
    torch.testing.assert_close(
        medgen.load(tmp_path / "merged").reconstruct(x), expected, rtol=1e-5, atol=1e-6
    )
    assert has_lora(model)  # the model itself keeps its adapters
    other = tmp_path / "other"
    make_vae(seed=7).save_pretrained(other)
    with pytest.raises(CheckpointError, match="SHA-256"):
        medgen.load(adapter, base=other)
    with pytest.raises(CheckpointError, match="already holds"):
        save_adapter(model, adapter, base_dir)
    with pytest.raises(CheckpointError, match="adapter folder"):
        medgen.pretrained.load(adapter)


# ----------------------------------------------------------------------------- config keys
def test_config_keys_never_reach_the_constructor_and_are_checked(base_dir):
    from medgen.utils.instantiate import instantiate, to_plain

    cfg = medgen.compose(
        "train",
        [
            "experiment=finetune_vae",
            f"model.init_from={base_dir}",
            "model.finetune.freeze=[net.decoder.*]",
            "model.net.channels=[4,8]",
            "model.net.latent_channels=2",
            "model.net.norm_num_groups=2",
        ],
    )
    model_cfg = to_plain(cfg.model)
    model = instantiate(model_cfg, _recursive_=False)
    callbacks = setup_finetune(model, model_cfg)
    assert _same(model.net, medgen.load(base_dir).net)
    assert len(callbacks) == 1
    assert not any(p.requires_grad for p in model.net.decoder.parameters())
    with pytest.raises(ValueError, match=r"model\.finetune\.frezee"):
        setup_finetune(model, {"finetune": {"frezee": []}})
    with pytest.raises(ValueError, match="model.init_from is required"):
        setup_finetune(model, {"init_from": "???"})


def test_finetune_pix2pix_freezes_the_discriminators_first_layers():
    from medgen.finetune import frozen_norms
    from medgen.utils.instantiate import instantiate, to_plain

    cfg = medgen.compose("train", ["experiment=finetune_pix2pix"])
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    patterns = list(cfg.model.finetune.freeze)
    (callback,) = apply_finetune(model, freeze_patterns=patterns)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("discriminator.model.") for n in frozen)
    assert all(p.requires_grad for p in model.generator.parameters())
    norms = frozen_norms(model, patterns)
    assert norms and all(isinstance(m, nn.BatchNorm2d) for m in norms)  # FreezeD's frozen BN


def test_converter_setting_converts_into_the_run_folder(tmp_path):
    from monai.networks.nets import DiffusionModelUNet

    from medgen.convert import convert

    config = dict(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        num_res_blocks=1,
        channels=[8, 16],
        attention_levels=[False, True],
        norm_num_groups=8,
    )
    torch.manual_seed(0)
    monai_unet = DiffusionModelUNet(**config).eval()
    torch.nn.init.normal_(monai_unet.out[2].conv.weight)  # not zero: outputs to compare
    torch.save(monai_unet.state_dict(), tmp_path / "unet.pt")
    reference = convert("monai-diffusion-unet", tmp_path / "unet.pt", tmp_path / "ref", **config)
    init_args = json.loads((reference / "config.json").read_text())["init_args"]
    model = type(medgen.load(reference))(**init_args)  # the model the config builds, fresh
    model_cfg = {
        "init_from": str(tmp_path / "unet.pt"),
        "finetune": {"converter": "monai-diffusion-unet", "converter_options": config},
    }
    setup_finetune(model, model_cfg, output_dir=tmp_path / "run", convert=convert)
    assert (tmp_path / "run" / "converted" / "model.safetensors").is_file()
    missing = json.loads((tmp_path / "run" / "init_from.json").read_text())["missing"]
    assert all(k.startswith("val_features.") for k in missing)  # not exported: metric features
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    torch.testing.assert_close(model.net.eval()(x, t), monai_unet(x, t), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="run layer"):
        setup_finetune(model, model_cfg)  # no convert function: say how to do it in Python
