"""Composing configs the way the command line does, for use from Python."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIG_MODULE", "compose", "register_resolvers", "single_log_output"]

CONFIG_MODULE = "medgen.configs"


def register_resolvers() -> None:
    """Register the ``${now:...}`` resolver that Hydra registers only inside its own app."""
    if not OmegaConf.has_resolver("now"):  # Hydra registers it only inside its own app
        OmegaConf.register_new_resolver(
            "now", lambda pattern: datetime.now().strftime(pattern), use_cache=True
        )


def single_log_output() -> None:
    """Print each Lightning log line once when the root logger has handlers (Hydra's job log).

    ``import lightning`` gives the ``lightning`` logger a console handler of its own, and the lines
    also propagate to the root logger: under Hydra's job logging every INFO line came out twice.
    With root handlers present, Lightning's own console handlers are removed and its lines go
    through the root's handlers (console and ``<output_dir>/train.log``); without them (a
    notebook, a plain script) nothing changes.
    """
    import lightning  # noqa: F401 - its import adds the handlers removed here

    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def compose(
    config_name: str = "train",
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """Compose a medgen config the way the command line does, for use from Python.

    Args:
        config_name: ``"train"``, ``"sample"`` or ``"eval"`` (or a config of ``config_dir``).
        overrides: Hydra overrides, e.g. ``["experiment=quickstart", "trainer.max_epochs=2"]``.
        config_dir: Optional folder of your own configs, searched before medgen's packaged
            ones (like ``--config-dir`` on the command line).

    Returns:
        The composed config (without the ``hydra`` node).

    Composing changes neither the working directory nor the logging set-up, and leaves no
    global Hydra state behind: compose and train as often as you like in one kernel.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_resolvers()
    overrides = list(overrides)
    if config_dir is not None:
        uri = Path(config_dir).resolve().as_uri()
        overrides.append(f"hydra.searchpath=[{uri}]")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)
