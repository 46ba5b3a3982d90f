"""Loading a config, checkpoint or export from someone else never runs code; old files still load.

Each attack names a callable that would create a marker file if it ran (``torch.utils.collect_env
.run`` runs a shell command); every test checks both the error and that the marker is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import medgen
from medgen.pretrained import CheckpointError
from medgen.utils.instantiate import InstantiationError, instantiate
from medgen.utils.targets import (
    ALIASES,
    TARGETS,
    UnsafeTargetError,
    public_name,
    register_target,
    resolve_target,
)

LEGACY = Path(__file__).parent / "fixtures" / "legacy"

# Ways to reach a shell through attribute walking or allowed-looking prefixes.
EVIL_TARGETS = [
    "torch.utils.collect_env.run",
    "torch.os.system",
    "os.system",
    "builtins.eval",
    "medgen.api.os.system",
    "medgen.models.GAN.__init__.__globals__.os.system",
    "medgen.utils.targets.importlib.import_module",
    "subprocess.run",
    "torch.optim.Adam.__init__.__globals__.torch.os.system",
    "lightning.pytorch.trainer.trainer.os.system",
]


def _attack(target: str, marker: Path) -> dict:
    """A config node that, if built, would run ``touch marker``."""
    if target.endswith("collect_env.run"):
        return {"_target_": target, "command": f"touch {marker}"}
    return {"_target_": target, "_args_": [f"touch {marker}"]}


@pytest.mark.parametrize("target", EVIL_TARGETS)
def test_instantiate_refuses_everything_off_the_list(target, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeTargetError, match="is not allowed"):
        instantiate(_attack(target, marker))
    # nested, in a list, in kwargs and as a partial: refused before anything is built
    with pytest.raises(UnsafeTargetError, match=r"config key 'a\.b\[1\]'"):
        instantiate({"_target_": "torch.optim.SGD", "a": {"b": [1, _attack(target, marker)]}})
    with pytest.raises(UnsafeTargetError):
        instantiate({"_target_": "torch.optim.SGD"}, extra=_attack(target, marker))
    with pytest.raises(UnsafeTargetError):
        instantiate({**_attack(target, marker), "_partial_": True})
    assert not marker.exists()


def test_strings_are_never_interpreted(tmp_path):
    marker = tmp_path / "pwned"
    # An escaped interpolation survives OmegaConf's resolution as a literal "${...}" string, which
    # Hydra's instantiate reads as an interpolation again (and then builds the node it creates:
    # that runs the command). Ours passes strings through untouched.
    payload = f"{{_target_: torch.utils.collect_env.run, command: 'touch {marker}'}}"
    cfg = OmegaConf.create(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": "\\${oc.create:" + payload + "}"}
    )
    built = instantiate(cfg)
    assert built.keywords["lr"] == "${oc.create:" + payload + "}"
    assert instantiate({"x": "${oc.env:HOME}"}) == {"x": "${oc.env:HOME}"}
    assert not marker.exists()


def test_allowed_targets_build_partials_args_and_errors_name_the_key():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = instantiate({"_target_": "torch.optim.Adam", "lr": 0.1, "betas": [0.5, 0.9]}, params)
    assert isinstance(opt, torch.optim.Adam) and tuple(opt.defaults["betas"]) == (0.5, 0.9)
    part = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5})
    assert part(params).defaults["lr"] == 0.5
    pipe = instantiate(
        {
            "_target_": "medgen.data.presets.Pipeline",
            "_args_": [{"_target_": "medgen.data.presets.CTWindow", "low": -100, "high": 100}],
        }
    )
    assert pipe(torch.full((1, 2, 2), 100.0)).max() == 1.0
    with pytest.raises(InstantiationError, match=r"config key 'net': building medgen.nets.VAENet"):
        instantiate({"holder": 1, "net": {"_target_": "medgen.nets.VAENet", "nonsense": 1}})


def test_every_listed_target_resolves_and_aliases_point_to_the_same_object():
    for name in TARGETS:
        assert callable(resolve_target(name)), name
    for old, new in ALIASES.items():
        assert resolve_target(old) == resolve_target(new), old
    for name in TARGETS:  # checkpoints of older mains name the defining module: all resolve
        obj = resolve_target(name)
        if name.startswith("medgen.") and isinstance(obj, type):
            defining = f"{obj.__module__}.{obj.__qualname__}"
            assert defining == name or ALIASES.get(defining) == name, defining
    assert public_name(medgen.models.GAN) == "medgen.models.GAN"
    assert public_name(medgen.data.presets.CTWindow) == "medgen.data.presets.CTWindow"
    with pytest.raises(UnsafeTargetError):
        public_name(Path)
    assert public_name(Path, strict=False) == "pathlib.Path"


def test_register_target_allows_trusted_code_only_by_explicit_call():
    class Mine:
        def __init__(self, value: int) -> None:
            self.value = value

    with pytest.raises(UnsafeTargetError):
        instantiate({"_target_": f"{__name__}.Mine", "value": 3})
    name = register_target(Mine, f"{__name__}.Mine")
    assert instantiate({"_target_": name, "value": 3}).value == 3


# --------------------------------------------------------------------- exported folders, .ckpt


def _copy_export(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(LEGACY / "quickstart" / "model", dst)
    return dst


@pytest.mark.parametrize("target", EVIL_TARGETS)
def test_export_with_a_hostile_target_is_refused(target, tmp_path):
    marker = tmp_path / "pwned"
    folder = _copy_export(tmp_path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())

    top = dict(config, _target_=target)  # vector 1: the model class itself
    config_path.write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match="config.json"):
        medgen.load(folder)

    nested = dict(config)  # vector 2: a nested config (the optimiser) in init_args
    nested["init_args"] = dict(config["init_args"], optimizer=_attack(target, marker))
    config_path.write_text(json.dumps(nested))
    with pytest.raises(CheckpointError, match="config.json"):
        medgen.load(folder)
    assert not marker.exists()


def _evil_ckpt(tmp_path: Path, target: str, where: str) -> Path:
    marker = tmp_path / "pwned"
    ckpt = torch.load(LEGACY / "quickstart" / "last.ckpt", weights_only=True)
    if where == "class":  # vector 3: the checkpoint's model class
        ckpt["medgen_target"] = target
    else:  # vector 4: a nested config in the stored hyper-parameters
        ckpt["hyper_parameters"]["net"] = _attack(target, marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("where", ["class", "hparams"])
@pytest.mark.parametrize("target", ["torch.utils.collect_env.run", "torch.os.system"])
def test_checkpoint_with_a_hostile_target_is_refused(target, where, tmp_path):
    path = _evil_ckpt(tmp_path, target, where)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        medgen.load(path)
    # medgen-sample checkpoint=... goes through the same loader
    cfg = medgen.compose(
        "sample", overrides=[f"checkpoint={path}", f"output_dir={tmp_path / 'out'}"]
    )
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        medgen.sample(cfg)
    assert not (tmp_path / "pwned").exists()


def test_training_config_with_a_hostile_target_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    cfg = medgen.compose(
        "train",
        overrides=[
            f"paths.output_dir={tmp_path / 'run'}",
            "model.optimizer._target_=torch.utils.collect_env.run",
            f"+model.optimizer.command='touch {marker}'",
        ],
    )
    with pytest.raises(UnsafeTargetError, match="model.optimizer|optimizer"):
        medgen.train(cfg)
    cfg = medgen.compose(
        "train",
        overrides=[f"paths.output_dir={tmp_path / 'run2'}", "trainer._target_=torch.os.system"],
    )
    with pytest.raises(UnsafeTargetError):
        medgen.train(cfg)
    assert not marker.exists()


def test_export_whose_arguments_or_shapes_do_not_match_names_the_file(tmp_path):
    folder = _copy_export(tmp_path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    bad_args = dict(config, init_args=dict(config["init_args"], no_such_argument=1))
    config_path.write_text(json.dumps(bad_args))
    with pytest.raises(CheckpointError, match=r"config\.json.*does not build a VAE"):
        medgen.load(folder)
    net = dict(config["init_args"]["net"], channels=[4, 16])  # same keys, other shapes
    config_path.write_text(json.dumps(dict(config, init_args=dict(config["init_args"], net=net))))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        medgen.load(folder)


# --------------------------------------------------------------------- checkpoints of older mains

LEGACY_EXPORTS = sorted(p.parent.parent.name for p in LEGACY.glob("*/model/config.json"))
LEGACY_CKPTS = sorted(p.parent.name for p in LEGACY.glob("*/last.ckpt"))


@pytest.mark.parametrize("name", LEGACY_EXPORTS)
def test_exports_written_by_an_older_main_load_with_their_exact_weights(name):
    folder = LEGACY / name / "model"
    assert json.loads((folder / "config.json").read_text())["_target_"].count(".") == 3
    model = medgen.load(folder)
    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize("name", LEGACY_CKPTS)
def test_checkpoints_written_by_an_older_main_load_and_resave_public_names(name, tmp_path):
    path = LEGACY / name / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["medgen_target"].count(".") == 3  # medgen.models.<module>.<Class>
    model = medgen.load(path, use_ema=False)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    exported = model.save_pretrained(tmp_path / "re")
    target = json.loads((exported / "config.json").read_text())["_target_"]
    assert target == f"medgen.models.{type(model).__name__}"
    assert type(medgen.load(exported)) is type(model)
