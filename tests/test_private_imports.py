"""No module of medgen uses another medgen module's ``_private`` names (DESIGN.md, redesign rules).

A name that two modules share is made public in the lower module, or moved to a shared one. The
test parses every module with :mod:`ast` (nothing is imported) and reports

* ``from medgen.x import _y`` (and the relative form ``from .x import _y``), and
* ``module._y`` where ``module`` is a medgen module bound by an import
  (``import medgen.x as m; m._y`` or ``from medgen import x; x._y``),

where ``_y`` starts with a single underscore (dunders such as ``__version__`` are public).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

#: The package's source folder; found from this file, so that nothing is imported.
PACKAGE = Path(__file__).resolve().parents[1] / "medgen"

#: ``(importing file, imported module, name)`` that may stay for now: none (keep it that way).
ALLOWED: frozenset[tuple[str, str, str]] = frozenset()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` (``medgen.a.b``) names a module or package of medgen."""
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    base = PACKAGE / rel
    return (
        dotted == "medgen" or base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    )


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def private_uses(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for every private name of another medgen module ``source`` uses.

    Args:
        source: The module's code.
        module: Its dotted name (``medgen.nets.gan``), to resolve relative imports.
        is_package: Whether it is a package's ``__init__``.
    """
    tree = ast.parse(source)
    found: list[tuple[int, str, str]] = []
    aliases: dict[str, str] = {}  # local name -> medgen module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _absolute(node, module, is_package)
            if origin != "medgen" and not origin.startswith("medgen."):
                continue
            for alias in node.names:
                if _is_private(alias.name) and origin != module:
                    found.append((node.lineno, origin, alias.name))
                if _is_module(f"{origin}.{alias.name}"):
                    aliases[alias.asname or alias.name] = f"{origin}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "medgen" or alias.name.startswith("medgen."):
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["medgen"] = "medgen"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        dotted = _dotted(node.value)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        if head not in aliases:
            continue
        target = ".".join(filter(None, [aliases[head], rest]))
        if _is_module(target) and target != module:
            found.append((node.lineno, target, node.attr))
    return found


@functools.cache
def _all_uses() -> dict[tuple[str, str, str], int]:
    uses: dict[tuple[str, str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        for line, source, name in private_uses(
            text, _module_name(path), path.name == "__init__.py"
        ):
            uses.setdefault((rel, source, name), line)
    return uses


def test_no_module_imports_another_modules_private_names():
    wrong = [
        f"{rel}:{line} uses {name} from {source}"
        for (rel, source, name), line in _all_uses().items()
        if (rel, source, name) not in ALLOWED
    ]
    assert not wrong, (
        "private names used across modules; make them public in the lower module or move them "
        "to a shared one:\n" + "\n".join(wrong)
    )


def test_allow_list_has_no_stale_entries():
    stale = sorted(ALLOWED - set(_all_uses()))
    assert not stale, f"no longer used, remove from ALLOWED in {Path(__file__).name}: {stale}"


def test_the_scan_finds_every_form():
    """The checker itself: each form of private use is caught, public and own names are not."""
    source = (
        "import medgen.nets.translation\n"
        "import medgen.nn.factories as fac\n"
        "from medgen.nn import checkpointing\n"
        "from medgen.nets.translation import _norm, init_weights, __doc__\n"
        "from .gan import _channels\n"
        "from . import translation as tr\n"
        "medgen.nets.translation._conv_bias\n"
        "fac._group_norm\n"
        "checkpointing._recompute_contexts\n"
        "tr._padding_mode\n"
        "fac.split_spec\n"
        "self_obj = object()\n"
        "self_obj._private\n"
    )
    uses = {(origin, name) for _, origin, name in private_uses(source, "medgen.nets.probe")}
    assert uses == {
        ("medgen.nets.translation", "_norm"),
        ("medgen.nets.gan", "_channels"),
        ("medgen.nets.translation", "_conv_bias"),
        ("medgen.nn.factories", "_group_norm"),
        ("medgen.nn.checkpointing", "_recompute_contexts"),
        ("medgen.nets.translation", "_padding_mode"),
    }
