"""Imports point down the layers of DESIGN.md, and model families declare what they can do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import medgen
from medgen.models.base import CAPABILITIES

PACKAGE = Path(medgen.__file__).parent

#: Layer of each top-level module of medgen: a module may import its own package or a lower
#: layer, never a higher one (docs/index.md, "Architecture").
LAYERS = {
    "version": 0,
    "utils": 0,
    "nn": 1,
    "data": 1,
    "features": 1,
    "nets": 2,
    "metrics": 2,
    "inference": 2,
    "diffusion": 2,
    "augment": 2,
    "viz": 2,  # notebook views and image grids (matplotlib imported lazily); uses data
    "losses": 3,
    "pretrained": 3,
    "models": 4,
    "finetune": 4,  # init_from, freezing, LoRA: used by models' optimisers and by medgen.load
    "callbacks": 5,
    "convert": 5,  # foreign weights -> medgen exports (nets, models, pretrained)
    "runs": 6,
    "api": 7,
    "cli": 7,
    "tiling": 7,  # a re-export kept for old imports
    "__init__": 8,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return (
        rel.parts[0].removesuffix(".py")
        if len(rel.parts) > 1 or rel.stem != "__init__"
        else "__init__"
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "medgen":
                names = [f"medgen.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names[:1] if n.startswith("medgen")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("medgen")]
    return found


def test_every_module_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py") if "configs" not in p.parts}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "configs" in path.parts:
            continue
        source = _unit(path)
        for line, name in _imports(path):
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == source or target not in LAYERS:
                continue
            if LAYERS[target] > LAYERS[source]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, "imports pointing up a layer:\n" + "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    probe = PACKAGE / "nn" / "_layer_probe_for_test.py"
    probe.write_text("from medgen.models import GAN\n")
    try:
        with pytest.raises(
            AssertionError, match="_layer_probe_for_test.py:1 imports medgen.models"
        ):
            test_imports_point_down()
    finally:
        probe.unlink()


def test_model_families_declare_their_capabilities():
    from medgen.models import (
        GAN,
        VAE,
        VQGAN,
        AGGrGAN,
        AutoencoderKL,
        CycleGAN,
        Diffusion,
        Pix2Pix,
    )

    expected = {
        VAE: {"sample"},
        GAN: {"sample"},
        AGGrGAN: {"sample", "write_dataset"},
        AutoencoderKL: {"sample", "encode"},
        VQGAN: {"sample", "encode"},
        Diffusion: {"sample", "sampler_options"},
        Pix2Pix: {"translate"},
        CycleGAN: {"translate"},
    }
    for cls, capabilities in expected.items():
        assert cls.capabilities == capabilities, cls.__name__
        assert capabilities <= set(CAPABILITIES)
    assert VQGAN.latent_kind == "codebook" and AutoencoderKL.latent_kind == "posterior_mean"
    with pytest.raises(ValueError, match="unknown capability"):
        VAE(net={"channels": [4], "norm_num_groups": 4}).supports("fly")
