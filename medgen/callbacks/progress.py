"""A progress bar that renders in a terminal and in a notebook, with or without ipywidgets.

Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar` draws a live display; in
Jupyter, rich needs ipywidgets for it and shows nothing at all without them. Its
:class:`~lightning.pytorch.callbacks.TQDMProgressBar` uses ``tqdm.auto`` (a widget bar) when
ipywidgets is installed and plain text bars otherwise, which render in every front end.
:func:`ProgressBar` therefore picks rich in a terminal and tqdm in a notebook.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ProgressBar", "in_notebook"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (a ZMQ IPython shell), False in a terminal or script."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def ProgressBar(  # noqa: N802 - used as a class in configs (``_target_: medgen.callbacks.ProgressBar``)
    refresh_rate: int = 1, leave: bool = True, kind: str = "auto"
) -> Any:
    """The progress bar callback for where the run is shown.

    Args:
        refresh_rate: Redraw every this many batches.
        leave: Keep each epoch's finished bar on screen.
        kind: ``"auto"`` (rich in a terminal, tqdm in a notebook), ``"rich"`` or ``"tqdm"``.

    Returns:
        A Lightning :class:`~lightning.pytorch.callbacks.RichProgressBar` or
        :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if kind not in ("auto", "rich", "tqdm"):
        raise ValueError(f"progress bar kind must be auto, rich or tqdm, got {kind!r}")
    if kind == "auto":
        kind = "tqdm" if in_notebook() else "rich"
    if kind == "rich":
        return RichProgressBar(refresh_rate=refresh_rate, leave=leave)
    return TQDMProgressBar(refresh_rate=refresh_rate, leave=leave)
