"""Console scripts: thin Hydra wrappers over :mod:`medgen.api`.

``medgen-train``, ``medgen-sample``, ``medgen-eval`` and ``medgen-encode`` accept Hydra's flags
(``--cfg job``, ``--config-dir DIR``, ``--multirun``, ``--help``) and ``key=value`` overrides.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

CONFIG_PATH = "pkg://medgen.configs"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> None:
    from medgen.runs import train

    train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def _sample(cfg: DictConfig) -> None:
    from medgen.runs import sample

    sample(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from medgen.runs import evaluate

    evaluate(cfg)


def train_main() -> None:
    """Entry point of ``medgen-train``."""
    _train()


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
