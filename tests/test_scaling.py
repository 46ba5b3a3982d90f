"""Scaling presets on a CPU: trainer presets, FSDP blocks, launchers, hardware presets, memory.

What a CPU can check is checked here; what needs GPUs is said where it is skipped:

* ``trainer=gpu|ddp`` build a Lightning ``Trainer`` with the accelerator switched to CPU;
* ``trainer=fsdp``: the strategy object builds from block names, Lightning refuses it on a CPU
  (``FSDPStrategy requires a GPU accelerator``; torch's FSDP1 underneath also refuses a CPU), so
  the sharding of the preset's blocks runs through torch's FSDP2 (``fully_shard``) on two gloo
  processes instead, with the preset's activation checkpointing, against one process;
* ``launcher=slurm`` renders the sbatch script submitit would submit;
* every ``hardware=`` preset composes with every 3D experiment and builds the model;
* :func:`medgen.runs.memory.estimate_memory` measures a tiny CPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import medgen
from medgen.runs.memory import FSDP_BLOCKS, estimate_memory, fsdp_strategy, resolve_blocks
from medgen.utils.instantiate import instantiate, to_plain
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "medgen" / "configs"
EXPERIMENTS_3D = [
    "ddpm_3d",
    "rflow_3d",
    "ldm_3d",
    "medical_diffusion",
    "vae_3d",
    "autoencoder_kl_3d",
    "vqgan_3d",
    "pix2pix_3d",
]
HARDWARE = ["gpu16", "gpu24", "gpu40", "gpu80"]


def _compose(tmp_path: Path, *overrides: str):
    return medgen.compose("train", [f"paths.output_dir={tmp_path}", *overrides])


def _hydra_compose(*overrides: str):
    """Compose with the ``hydra`` node (launcher settings live there)."""
    from hydra import compose, initialize_config_module

    medgen.runs.register_resolvers()
    with initialize_config_module("medgen.configs", version_base="1.3"):
        return compose("train", list(overrides), return_hydra_config=True)


# ------------------------------------------------------------------------- trainer presets
def test_every_trainer_preset_file_is_tested():
    presets = {p.stem for p in (CONFIGS / "trainer").glob("*.yaml")} - {"default"}
    assert presets == {"cpu", "gpu", "ddp", "ddp_cpu", "fsdp"}


@pytest.mark.parametrize(
    ("preset", "strategy"),
    [
        ("cpu", "SingleDeviceStrategy"),
        ("gpu", "SingleDeviceStrategy"),
        ("ddp", "DDPStrategy"),
        ("ddp_cpu", "DDPStrategy"),
    ],
)
def test_trainer_preset_builds_a_trainer_on_cpu(preset, strategy, tmp_path):
    cfg = _compose(tmp_path, "experiment=ddpm_3d", f"trainer={preset}")
    conf = to_plain(cfg.trainer)
    if preset in ("gpu", "ddp"):
        assert conf["accelerator"] == "gpu" and conf["precision"] == "bf16-mixed"
        assert conf["devices"] == (1 if preset == "gpu" else "auto")
        conf["accelerator"] = "cpu"  # no GPU here: the rest of the preset is built as is
    trainer = instantiate(conf, _convert_="all")
    assert type(trainer.strategy).__name__ == strategy
    assert trainer.precision == conf["precision"]


def test_fsdp_preset_keys(tmp_path):
    cfg = _compose(tmp_path, "experiment=ddpm_3d", "trainer=fsdp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == "auto"
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = cfg.trainer.strategy
    assert strategy._target_ == "medgen.runs.memory.fsdp_strategy"
    assert set(strategy.auto_wrap) == set(strategy.activation_checkpointing)
    assert {"medgen.nn.ResBlock", "medgen.nn.SelfAttention"} <= set(strategy.auto_wrap)
    assert set(strategy.auto_wrap) <= set(FSDP_BLOCKS)
    assert strategy.use_orig_params is True and strategy.state_dict_type == "full"


def test_fsdp_strategy_builds_from_block_names(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from medgen.nn import ResBlock, SelfAttention

    cfg = _compose(tmp_path, "experiment=ddpm_3d", "trainer=fsdp")
    kwargs = {k: v for k, v in to_plain(cfg.trainer.strategy).items() if k != "_target_"}
    strategy = fsdp_strategy(**kwargs)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert {ResBlock, SelfAttention} <= set(policy._module_classes)
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy._activation_checkpointing_kwargs  # the same blocks are checkpointed

    # Built from the config as medgen-train builds it (the factory allowed as a target).
    from medgen.utils import targets

    name = cfg.trainer.strategy._target_
    added = name not in targets.TARGETS
    if added:
        targets.register_target(fsdp_strategy, name)
    try:
        built = instantiate(to_plain(cfg.trainer.strategy))
    finally:
        if added:
            targets._REGISTERED.pop(name, None)
    assert isinstance(built, FSDPStrategy)
    assert set(built.kwargs["auto_wrap_policy"]._module_classes) == set(policy._module_classes)


def test_fsdp_block_names_resolve_only_from_the_table():
    assert resolve_blocks(None) == set()
    with pytest.raises(ValueError, match="FSDP_BLOCKS"):
        resolve_blocks(["os.system"])
    with pytest.raises(ValueError, match="not allowed"):
        resolve_blocks(["torch.nn.Linear"])
    for name in FSDP_BLOCKS:
        (cls,) = resolve_blocks([name])
        assert issubclass(cls, torch.nn.Module)


def test_lightning_refuses_fsdp_on_cpu():
    """Why the sharding test below uses FSDP2 directly: Lightning's FSDPStrategy needs a GPU."""
    import lightning as L

    strategy = fsdp_strategy(auto_wrap=["medgen.nn.ResBlock"])
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy)


def test_fsdp_target_is_on_the_allowlist():
    from medgen.utils.targets import TARGETS

    assert "medgen.runs.memory.fsdp_strategy" in TARGETS


_FSDP2_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def net():
        from medgen.nets import DiffusionUNet
        torch.manual_seed(0)
        return DiffusionUNet(2, 1, 1, num_res_blocks=1, channels=[8, 16],
                             attention_levels=[False, True],
                             num_head_channels=8, norm_num_groups=4)

    def batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)

    def worker(rank, world, store, wrap, ckpt, out):
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from medgen.runs.memory import resolve_blocks
        model = net().train()
        ckpt_classes = tuple(resolve_blocks(ckpt))
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, ckpt_classes))
        mesh = init_device_mesh("cpu", (world,))
        wrap_classes = tuple(resolve_blocks(wrap))
        units = [m for m in model.modules() if isinstance(m, wrap_classes)]
        for m in units:
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, t = batch()
        half = slice(2 * rank, 2 * rank + 2)
        loss = (model(x[half], t[half]) - x[half]).square().mean()
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        local = sum(p.to_local().numel() for p in model.parameters())
        full = sum(p.numel() for p in model.parameters())
        if rank == 0:
            torch.save({"grads": grads, "units": len(units), "local": local, "full": full}, out)
        dist.destroy_process_group()

    if __name__ == "__main__":
        wrap, ckpt, store, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
        import medgen.nets, medgen.runs.memory  # noqa: F401  (imported once, before the fork)
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        mp.start_processes(worker, args=(2, store, wrap, ckpt, out), nprocs=2, join=True,
                           start_method="fork")
        result = torch.load(out)
        ref = net().train()
        x, t = batch()
        (ref(x, t) - x).square().mean().backward()
        names = [n.replace("_checkpoint_wrapped_module.", "") for n in result["grads"]]
        grads = dict(zip(names, result["grads"].values()))
        err = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        print(json.dumps({"units": result["units"], "local": result["local"],
                          "full": result["full"], "max_err": err, "grad_scale": scale}))
    """
)


def test_fsdp_preset_blocks_shard_on_two_cpu_processes(tmp_path):
    """The preset's wrap and checkpoint blocks under torch FSDP2 + gloo equal one process.

    Two processes each take half of a batch of 4 through a tiny 2D diffusion UNet sharded per
    preset block (``fully_shard``, what FSDP2 offers on a CPU; Lightning's FSDPStrategy and
    torch's FSDP1 refuse a CPU), with the preset's activation checkpointing applied as Lightning
    applies it; the averaged, gathered gradients equal one process's on the whole batch.
    """
    cfg = _compose(tmp_path, "experiment=ddpm_2d", "trainer=fsdp")
    wrap = list(cfg.trainer.strategy.auto_wrap)
    ckpt = list(cfg.trainer.strategy.activation_checkpointing)
    script = tmp_path / "fsdp2.py"
    script.write_text(_FSDP2_SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            json.dumps(wrap),
            json.dumps(ckpt),
            str(tmp_path / "store"),
            str(tmp_path / "grads.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["units"] >= 6  # every ResBlock and SelfAttention is its own FSDP unit
    assert result["local"] < 0.6 * result["full"]  # each rank holds about half the weights
    assert result["grad_scale"] > 1e-3
    assert result["max_err"] < 1e-5 * max(1.0, result["grad_scale"])


# ---------------------------------------------------------------------------- launchers
def test_slurm_launcher_renders_submitit_parameters(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    submitit = pytest.importorskip("submitit")
    from hydra.utils import instantiate as hydra_instantiate
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = _hydra_compose(
        "experiment=ddpm_3d",
        "trainer=ddp",
        "launcher=slurm",
        "launcher.nodes=2",
        "launcher.gpus_per_node=4",
        "launcher.partition=gpu",
        "launcher.timeout_min=600",
        "hydra.sweep.dir=/scratch/sweep",
    )
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    assert cfg.resume == "auto"  # a requeued job continues by itself
    assert (
        OmegaConf.to_container(cfg.paths)["output_dir"]
        == "${hydra:sweep.dir}/${hydra:sweep.subdir}"
    )
    conf = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert conf["_target_"].endswith("SlurmLauncher")
    assert conf["nodes"] == 2 and conf["gpus_per_node"] == 4 and conf["tasks_per_node"] == 4
    assert conf["timeout_min"] == 600 and conf["partition"] == "gpu"
    assert conf["max_num_timeout"] == 3
    assert conf["additional_parameters"] == {"requeue": True, "signal": "USR1@120"}

    # What the launcher passes to submitit (hydra_submitit_launcher's launch()), rendered as
    # the sbatch script, without submitting anything.
    # submitit's SLURM executor looks for srun; nothing is run (no job is submitted).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    launcher = hydra_instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        folder=tmp_path / "submitit",
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    params.pop("submitit_folder")
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb"}
    base |= {"nodes", "name", "stderr_to_stdout"}
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    assert executor._executor.max_num_timeout == 3
    sbatch = _make_sbatch_string(
        command="python -u -m submitit.core._submit",
        folder=tmp_path,
        **executor._executor.parameters,
    )
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=600",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",  # to Lightning's SLURM handler: checkpoint, requeue
    ]:
        assert line in sbatch, (line, sbatch)


def test_local_launcher_gives_every_job_its_folder(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    cfg = _hydra_compose(
        "experiment=quickstart", "launcher=local", f"hydra.sweep.dir={tmp_path}", "hydra.job.num=3"
    )
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    HydraConfig.instance().set_config(cfg)  # as inside a job of a --multirun
    try:
        assert cfg.paths.output_dir == f"{tmp_path}/3"
        assert cfg.paths.checkpoint_dir == f"{tmp_path}/3/checkpoints"
    finally:
        HydraConfig.instance().cfg = None


def test_no_launcher_by_default(tmp_path):
    cfg = _hydra_compose("experiment=quickstart")
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    assert "launcher" not in cfg and "hardware" not in cfg


# ---------------------------------------------------------------------- hardware presets
def _tuned(preset: str, experiment: str) -> dict:
    """The keys of hardware/tuned/<preset>/<experiment>.yaml, flattened to dotted paths."""
    conf = OmegaConf.to_container(
        OmegaConf.load(CONFIGS / "hardware" / "tuned" / preset / f"{experiment}.yaml")
    )
    flat: dict = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and key != "decode_kwargs":
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(conf)
    return flat


def test_every_3d_experiment_has_a_tuned_file_per_preset():
    tuned = CONFIGS / "hardware" / "tuned"
    found = {(p.parent.name, p.stem) for p in tuned.glob("*/*.yaml")}
    assert found == {(h, e) for h in HARDWARE for e in EXPERIMENTS_3D}


@pytest.mark.parametrize("experiment", EXPERIMENTS_3D)
@pytest.mark.parametrize("preset", HARDWARE)
def test_hardware_preset_composes_with_every_3d_experiment(preset, experiment, tmp_path):
    cfg = _compose(tmp_path, f"experiment={experiment}", f"hardware={preset}")
    OmegaConf.resolve(cfg)
    assert cfg.hardware.name == preset
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    tuned = _tuned(preset, experiment)
    assert {"data.batch_size", "data.train.size"} <= set(tuned)
    for key, value in tuned.items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        if isinstance(value, dict):  # decode_kwargs merge into the experiment's own
            assert value.items() <= got.items(), key
        else:
            assert got == value, key
    # The tuned keys are arguments the model and data module accept.
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    assert model.spatial_dims == 3
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    assert datamodule.batch_size == tuned["data.batch_size"]


def test_hardware_preset_without_tuned_file_sets_common_keys(tmp_path):
    base = _compose(tmp_path, "experiment=quickstart")
    cfg = _compose(tmp_path, "experiment=quickstart", "hardware=gpu24")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.data == base.data and cfg.model == base.model


def test_hardware_preset_with_other_3d_data(tmp_path):
    """Swapping in your own 3D data: drop the phantom size, give the patch size yourself."""
    cfg = _compose(
        tmp_path,
        "experiment=ddpm_3d",
        "hardware=gpu24",
        "data=nifti_patches",
        "data.train.source=/data/volumes",
        "~data.train.size",
        "data.train.patch_size=[96,96,96]",
    )
    assert "size" not in cfg.data.train
    assert list(cfg.data.train.patch_size) == [96, 96, 96]
    assert cfg.data.batch_size == _tuned("gpu24", "ddpm_3d")["data.batch_size"]


# ------------------------------------------------------------------------ estimate_memory
def test_estimate_memory_on_a_tiny_cpu_run(tmp_path):
    def run(batch: int) -> dict:
        overrides = [*tiny_overrides(tmp_path / f"b{batch}"), "data.train.size=32"]
        overrides += [f"data.batch_size={batch}", "trainer.precision=bf16-mixed"]
        return estimate_memory(medgen.compose("train", overrides), warmup=0, steps=1)

    small, large = run(2), run(4)
    for r in (small, large):
        assert r["peak_bytes"] > 0 and r["steps_per_s"] > 0
        assert r["method"].startswith("cpu estimate") and "saved_tensors_hooks" in r["method"]
        assert r["device"] == "cpu"
        assert r["peak_bytes"] >= r["formula_bytes"] and r["peak_bytes"] >= r["live_peak_bytes"]
        parts = r["breakdown"]
        # AdamW: two moments per weight, plus one step counter per parameter tensor
        assert parts["parameters"] > 0
        assert 2 * parts["parameters"] <= parts["optimizer_state"] < 2.01 * parts["parameters"]
        assert parts["ema"] > 0  # quickstart averages the net
        assert r["settings"]["precision"] == "bf16-mixed"
        assert r["settings"]["task_name"] == "quickstart"
    assert small["settings"]["input_shapes"]["image"] == [2, 1, 32, 32]
    assert large["settings"]["input_shapes"]["image"] == [4, 1, 32, 32]
    assert large["saved_tensor_bytes"] > small["saved_tensor_bytes"]
    assert large["peak_bytes"] > small["peak_bytes"]
    assert large["breakdown"] == small["breakdown"]  # the model does not change with the batch


def test_memory_estimate_key_reports_and_trains_nothing(tmp_path):
    cfg = medgen.compose("train", [*tiny_overrides(tmp_path), "memory_estimate=true"])
    result = medgen.train(cfg)
    written = json.loads((tmp_path / "memory.json").read_text())
    assert written["peak_bytes"] == result["memory"]["peak_bytes"] > 0
    assert written["settings"]["input_shapes"]["image"][0] == cfg.data.batch_size
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()


def test_estimate_memory_refuses_a_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = medgen.compose("train", [*tiny_overrides(tmp_path), "trainer=gpu"])
    with pytest.raises(RuntimeError, match="GPU"):
        estimate_memory(cfg)
