"""Every command and Python snippet in README.md and docs/**/*.md runs, so the docs cannot drift.

Conventions for documentation authors:

* A fenced block tagged ``python``/``py`` is executed; the Python blocks of one page share one
  namespace and run in page order (like notebook cells).
* A block tagged ``bash``/``sh``/``shell``/``console`` (or an untagged block whose first line
  starts with ``medgen``) is split into commands (``\\`` continuations joined, ``#`` comments and
  ``&&``/``;`` separators understood) and each command is checked:

  - ``medgen-train ...`` is composed with the block's overrides and then *built*: the config's
    types are checked, the data module is set up and one training batch read, and the model,
    callbacks, loggers and trainer are instantiated (on the CPU: GPU/DDP/FSDP presets are
    composed as written, then built with ``accelerator=cpu``, one device). The README's first
    ``medgen-train`` command (its quickstart) instead trains for real, with tiny overrides.
    ``--help``, ``--cfg``, ``--list`` and ``--info`` run the real command line.
  - ``medgen-sample``, ``medgen-eval``, ``medgen-encode`` and ``medgen`` run the real command
    line, in-process.
  - ``pip install`` is not run; the extras it names must exist in pyproject.toml.
    ``python -m pytest`` is not run (it is this suite).
  - Any other command is an error: mark the block as below.

* A ``yaml`` block whose first line is a comment naming a relative ``.yaml`` path
  (``# my_configs/experiment/my_experiment.yaml``) is written to that path before the page's
  blocks run (so a ``--config-dir my_configs`` command can use it); every yaml block must parse.
* A block that cannot run on a CPU box in seconds (GPU, SLURM, needs user files or weights) is
  preceded by the line ``<!-- skip-test: reason -->``.

All blocks run in one scratch folder (the current directory), in which the README's quickstart
run (``outputs/quickstart``) is trained once, so pages can sample from and load it. Python blocks
run with :func:`medgen.compose` shrinking every composed training run to the same tiny size.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[1]
SKIP = re.compile(r"^\s*<!--\s*skip-test:\s*(?P<reason>\S.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console", "zsh"}
YAML = {"yaml", "yml"}
#: Commands that only inspect: the real command line runs them, nothing trains.
INSPECT_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--list", "--info", "-i")

#: Keys that shrink any composed training run (set only where the composed config has the node).
TINY_DATA = {"data.train.length": 8, "data.val.length": 4, "data.batch_size": 4}
TINY_TRAINER = {
    "trainer.max_epochs": 1,
    "trainer.max_steps": 2,
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 1,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_model_summary": False,
}
#: A documented GPU/cluster preset is built on this CPU with these trainer settings instead.
CPU_TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "num_nodes": 1,
    "precision": "32-true",
    "strategy": "auto",
    "sync_batchnorm": False,
    "benchmark": False,
}


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown page."""

    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str  # "python", "shell" or "yaml"
    text: str
    skip: str | None  # the skip-test reason, if any

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _kind(lang: str, text: str) -> str | None:
    lang = lang.lower()
    if lang in PYTHON:
        return "python"
    if lang in SHELL:
        return "shell"
    if lang in YAML:
        return "yaml"
    if not lang and text.lstrip().startswith("medgen"):
        return "shell"
    return None


def extract_blocks(path: Path) -> list[Block]:
    """The Python, shell and YAML blocks of one Markdown page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page}:{i + 1}: code fence is never closed")
        body = "\n".join(
            line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end]
        )
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(prev)
        kind = _kind(match["lang"], body)
        if kind is not None:
            blocks.append(Block(page, i + 1, kind, body, skip["reason"] if skip else None))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in doc_pages() for block in extract_blocks(page)]


def shell_commands(text: str) -> list[list[str]]:
    """Split a shell block into commands (lists of words)."""
    commands: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words:
            if word in ("&&", ";", "||"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
        if current:
            commands.append(current)
    return commands


# --------------------------------------------------------------------------------------------
# running commands


def _tiny(cfg: Any, cpu: bool = False) -> Any:
    """Shrink a composed train config in place (only the nodes it has)."""
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        for key, value in TINY_DATA.items():
            if OmegaConf.select(cfg, key, default=None) is not None:
                OmegaConf.update(cfg, key, value)
        for key, value in TINY_TRAINER.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        if cfg.get("callbacks") and "progress_bar" in cfg.callbacks:
            del cfg.callbacks["progress_bar"]
        if "num_samples" in cfg:
            cfg.num_samples = min(int(cfg.num_samples), 2)
        if cpu:
            for key, value in CPU_TRAINER.items():
                if key in cfg.trainer or key in ("accelerator", "devices"):
                    cfg.trainer[key] = value
    return cfg


def build_run(cfg: Any) -> dict[str, Any]:
    """Build what a training run builds (data + one batch, model, callbacks, loggers, trainer)."""
    from medgen.runs.validation import check_config
    from medgen.utils.instantiate import instantiate, to_plain

    check_config(cfg)
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    nodes = [cfg.get("callbacks") or {}, cfg.get("logger") or {}]
    built = [
        [instantiate(to_plain(c), _convert_="all") for c in node.values() if c and "_target_" in c]
        for node in nodes
    ]
    trainer = instantiate(to_plain(cfg.trainer), callbacks=built[0], logger=built[1] or False)
    return {"batch": batch, "model": model, "trainer": trainer}


def _split_config_dir(args: list[str]) -> tuple[list[str], str | None]:
    rest, config_dir = [], None
    it = iter(args)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            config_dir = next(it)
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, config_dir


def run_cli(program: str, args: list[str]) -> str:
    """Run one medgen console script in-process; returns what it printed."""
    import importlib.metadata

    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert program in scripts, f"'{program}' is not a console script of the installed medgen"
    main = scripts[program].load()
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [program, *args]
    try:
        with contextlib.redirect_stdout(out):
            try:
                main()
            except SystemExit as exc:  # argparse/Hydra end --help and --list with exit(0)
                if exc.code not in (0, None):
                    raise AssertionError(
                        f"{program} {' '.join(args)} exited with {exc.code}"
                    ) from exc
    finally:
        sys.argv = saved
    return out.getvalue()


#: Commands already run (by the ``workdir`` fixture): (page, words).
_DONE: set[tuple[str, tuple[str, ...]]] = set()


def run_command(words: list[str], block: Block) -> None:
    program, args = words[0], words[1:]
    if (block.page, tuple(words)) in _DONE:
        return
    if program == "pip":
        check_pip(args)
    elif program.startswith("python") and args[:2] == ["-m", "pytest"]:
        pass  # the test suite itself
    elif program == "medgen-train" and not any(a.split("=")[0] in INSPECT_FLAGS for a in args):
        from medgen.runs.composition import compose

        overrides, config_dir = _split_config_dir(args)
        assert "--multirun" not in overrides and "-m" not in overrides, "mark sweeps skip-test"
        build_run(_tiny(compose("train", overrides, config_dir=config_dir), cpu=True))
    elif program.startswith("medgen"):
        run_cli(program, args)
    else:
        raise AssertionError(
            f"{block.id}: the docs test does not know how to run '{program}'; precede the block "
            "with '<!-- skip-test: reason -->' if it cannot run on a CPU box in seconds"
        )


def check_pip(args: list[str]) -> None:
    """``pip install -e ".[test]"``: the extras named must exist (nothing is installed)."""
    assert args and args[0] == "install", f"unexpected pip command: pip {' '.join(args)}"
    import importlib.metadata

    extras = set(importlib.metadata.metadata("medgen").get_all("Provides-Extra") or [])
    for arg in args[1:]:
        match = re.fullmatch(r"(?:\.|medgen)\[(?P<extras>[\w,-]+)\]", arg)
        if match:
            missing = set(match["extras"].split(",")) - extras
            assert not missing, f"pip install {arg}: no extra {sorted(missing)} in pyproject.toml"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One scratch folder for every block, with the README's quickstart run trained in it."""
    path = tmp_path_factory.mktemp("docs")
    previous = Path.cwd()
    os.chdir(path)
    try:
        main = next(b for b in ALL_BLOCKS if b.page == "README.md" and "medgen-train" in b.text)
        for words in shell_commands(main.text):
            if words[0] == "medgen-train":  # the quickstart, for real at a tiny size
                from medgen.runs.composition import compose
                from medgen.runs.training import train

                overrides, config_dir = _split_config_dir(words[1:])
                train(_tiny(compose("train", overrides, config_dir=config_dir)))
            else:
                run_command(words, main)
            _DONE.add((main.page, tuple(words)))
        assert (path / "outputs" / "quickstart" / "model" / "config.json").is_file(), (
            "the README's first medgen-train command must write outputs/quickstart"
        )
        yield path
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def namespaces() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
def tiny_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    """``medgen.compose`` in a snippet composes tiny runs."""
    from medgen.runs import composition

    original = composition.compose

    def compose(config_name: str = "train", overrides=(), config_dir=None):
        cfg = original(config_name, overrides, config_dir)
        return _tiny(cfg) if config_name == "train" else cfg

    monkeypatch.setattr(composition, "compose", compose)


def _write_yaml_files(page: str, workdir: Path) -> None:
    for block in ALL_BLOCKS:
        if block.page != page or block.lang != "yaml" or block.skip:
            continue
        first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
        match = re.fullmatch(r"#\s*(?P<path>[\w./-]+\.ya?ml)\s*", first)
        if match and not Path(match["path"]).is_absolute() and ".." not in match["path"]:
            target = workdir / match["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text)


# --------------------------------------------------------------------------------------------
# tests


def test_blocks_found() -> None:
    """The extractor sees the README's commands and Python, and skip reasons are given."""
    readme = [b for b in ALL_BLOCKS if b.page == "README.md"]
    assert {b.lang for b in readme} >= {"shell", "python"}
    assert any("medgen-train" in b.text for b in readme)
    assert shell_commands("pip install -e . && medgen-train a=1 \\\n  b=2  # note") == [
        ["pip", "install", "-e", "."],
        ["medgen-train", "a=1", "b=2"],
    ]


def test_extract_skip_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- skip-test: needs a GPU -->\n```bash\nmedgen-train trainer=gpu\n```\n\n"
        "```python\nx = 1\n```\n\n```\nloss = a + b\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    blocks = extract_blocks(page)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [
        ("shell", 4, "needs a GPU"),
        ("python", 8, None),
    ]


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang != "yaml"], ids=lambda b: b.id)
def test_doc_block(
    block: Block,
    workdir: Path,
    namespaces: dict[str, dict[str, Any]],
    tiny_compose: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(workdir)
    if block.page not in namespaces:
        _write_yaml_files(block.page, workdir)
        namespaces[block.page] = {"__name__": "__docs__"}
    if block.lang == "python":
        code = compile(block.text, block.id, "exec")
        exec(code, namespaces[block.page])  # noqa: S102 - our own documentation
    else:
        for words in shell_commands(block.text):
            run_command(words, block)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "yaml"], ids=lambda b: b.id)
def test_doc_yaml_parses(block: Block) -> None:
    yaml.safe_load(block.text)
