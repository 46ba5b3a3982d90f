"""Every config composes and instantiates; bad names fail with Hydra's helpful errors."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import medgen
from medgen.utils.instantiate import UnsafeTargetError, check_targets, instantiate, to_plain
from tests.conftest import EXPERIMENTS


def test_experiments_exist():
    assert {"quickstart", "vae_3d"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = medgen.compose("train", [f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.paths.checkpoint_dir == f"{tmp_path}/checkpoints"
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch[getattr(model, "image_key", "image")].ndim == 2 + model.spatial_dims
    trainer = instantiate(to_plain(cfg.trainer), _convert_="all")
    assert trainer.max_epochs >= 1
    for group in ("callbacks", "logger"):
        for node in cfg[group].values():
            if node is not None:  # an experiment may switch a callback off with null
                instantiate(to_plain(node), _convert_="all")


def test_default_experiment_is_quickstart():
    cfg = medgen.compose("train")
    assert cfg.task_name == "quickstart"
    assert cfg.model._target_ == "medgen.models.VAE"
    assert cfg.data.train.size == 64


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp", "ddp_cpu"])
def test_trainer_presets(preset):
    cfg = medgen.compose("train", [f"trainer={preset}"])
    if preset == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
    if preset == "ddp":
        assert cfg.trainer.strategy == "ddp"
    if preset == "cpu":
        assert cfg.trainer.accelerator == "cpu"


def test_overrides_reach_the_config():
    cfg = medgen.compose(
        "train", ["trainer.max_epochs=3", "data.batch_size=5", "logger=tensorboard"]
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.data.batch_size == 5
    assert "tensorboard" in cfg.logger


def test_unknown_experiment_lists_choices():
    with pytest.raises(MissingConfigException) as err:
        medgen.compose("train", ["experiment=does_not_exist"])
    assert "quickstart" in str(err.value)


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigCompositionException) as err:
        medgen.compose("train", ["trainer.no_such_key=1"])
    assert "no_such_key" in str(err.value)


def test_user_config_dir_adds_experiments(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quickstart\ntask_name: mine\ntrainer:\n  max_epochs: 2\n"
    )
    cfg = medgen.compose("train", ["experiment=mine"], config_dir=tmp_path)
    assert cfg.task_name == "mine"
    assert cfg.trainer.max_epochs == 2
    assert cfg.model.net.channels == [8, 16, 32]  # inherited from quickstart


def test_sample_and_eval_configs_require_their_arguments():
    for name, keys in {"sample": ["checkpoint", "output_dir"], "eval": ["real", "fake"]}.items():
        cfg = medgen.compose(name)
        for key in keys:
            assert OmegaConf.is_missing(cfg, key)


def test_instantiate_refuses_targets_outside_allowlist():
    with pytest.raises(UnsafeTargetError, match="os.system"):
        instantiate({"_target_": "os.system", "command": "echo hacked"})
    with pytest.raises(UnsafeTargetError, match=r"model\.net"):
        check_targets({"model": {"net": {"_target_": "builtins.eval"}}})
    opt = instantiate(
        {"_target_": "torch.optim.SGD", "lr": 0.1},
        [__import__("torch").zeros(1, requires_grad=True)],
    )
    assert opt.defaults["lr"] == 0.1
