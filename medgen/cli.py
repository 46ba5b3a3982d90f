"""Console scripts: thin Hydra wrappers over :mod:`medgen.api`.

``medgen-train``, ``medgen-sample``, ``medgen-eval`` and ``medgen-encode`` accept Hydra's flags
(``--cfg job``, ``--config-dir DIR``, ``--multirun``, ``--help``) and ``key=value`` overrides;
``medgen-train --list`` and ``medgen list KIND`` list experiments, models, data and samplers.
"""

from __future__ import annotations

import argparse
import sys

import hydra
from omegaconf import DictConfig

CONFIG_PATH = "pkg://medgen.configs"

#: Config groups shown by ``medgen-train --help``.
TRAIN_GROUPS = ("data", "model", "trainer", "logger", "callbacks", "hardware", "launcher", "debug")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> None:
    from medgen.runs import train
    from medgen.runs.composition import single_log_output

    single_log_output()
    train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def _sample(cfg: DictConfig) -> None:
    from medgen.runs import sample

    sample(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from medgen.runs import evaluate

    try:
        evaluate(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message, not a traceback
        raise SystemExit(f"medgen-eval: {err}") from None


def _config_dir(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config-dir="):
            return arg.split("=", 1)[1]
    return None


def train_help(config_dir: str | None = None) -> str:
    """The text of ``medgen-train --help``: usage, experiments with descriptions, groups."""
    import textwrap

    from medgen.runs.discovery import format_listing, list_configs

    groups = "\n".join(
        textwrap.fill(
            ", ".join(list_configs(group, config_dir)),
            width=100,
            initial_indent=f"{group + '=':<12}",
            subsequent_indent=" " * 12,
        )
        for group in TRAIN_GROUPS
    )
    return f"""medgen-train: train a generative model from composed configs (Hydra), offline.

usage: medgen-train [experiment=NAME] [GROUP=OPTION ...] [KEY=VALUE ...] [flags]

Writes checkpoints/, samples/, metrics.json and the exported model/ under paths.output_dir
(default outputs/<task_name>/<date_time>).

experiments (experiment=NAME; default quickstart):
{format_listing(list_configs("experiment", config_dir))}

config groups (GROUP=OPTION):
{groups}

examples:
  medgen-train experiment=ddpm_3d trainer=gpu data.batch_size=2
  medgen-train experiment=vae_3d debug=fdr        # one batch of training and validation
  medgen-train trainer.max_epochs=5 trainer.limit_train_batches=10 paths.output_dir=runs/test
  medgen-train resume=last paths.output_dir=runs/test

flags:
  --list                 experiments with their descriptions (also: medgen list models|data|...)
  --cfg job              print the composed config and exit
  --config-dir DIR       add a folder of your own configs (DIR/experiment/NAME.yaml, ...)
  --multirun, -m         sweeps (launcher=local|slurm)
  --hydra-help           Hydra's own flags

Documentation: docs/getting-started.md and docs/configs.md.
"""


def _wants(args: list[str], *flags: str) -> bool:
    return any(arg in flags for arg in args)


def train_main() -> None:
    """Entry point of ``medgen-train`` (``--list`` and ``--help`` are answered without Hydra)."""
    args = sys.argv[1:]
    if _wants(args, "--list"):
        from medgen.runs.discovery import format_listing, list_experiments

        print(format_listing(list_experiments(_config_dir(args))))
        return
    if _wants(args, "--help", "-h"):
        print(train_help(_config_dir(args)))
        return
    _train()


def medgen_main(argv: list[str] | None = None) -> None:
    """Entry point of ``medgen``: ``medgen list experiments|models|data|samplers|...``."""
    from medgen.runs.discovery import LISTABLE, format_listing, listing
    from medgen.version import __version__

    parser = argparse.ArgumentParser(
        prog="medgen",
        description="medgen: generative models for medical imaging. Train with medgen-train, "
        "sample with medgen-sample, evaluate with medgen-eval, encode with medgen-encode.",
    )
    parser.add_argument("--version", action="version", version=f"medgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    lister = commands.add_parser("list", help="list what can be chosen, with descriptions")
    lister.add_argument("kind", choices=sorted(LISTABLE), help="what to list")
    lister.add_argument("--config-dir", default=None, help="also list your own configs")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(format_listing(listing(args.kind, args.config_dir)))


def sample_main() -> None:
    """Entry point of ``medgen-sample``."""
    _sample()


def eval_main() -> None:
    """Entry point of ``medgen-eval``."""
    _eval()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="encode")
def _encode(cfg: DictConfig) -> None:
    from medgen.runs import encode

    encode(cfg)


def encode_main() -> None:
    """Entry point of ``medgen-encode``."""
    _encode()


def convert_main() -> None:
    """Entry point of ``medgen-convert SRC DST --from NAME [key=value ...]`` (no Hydra)."""
    from medgen.convert import main

    raise SystemExit(main())
