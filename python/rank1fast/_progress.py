"""Progress reporting shared by every long call: tqdm bars, callables, or nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

ProgressArg = bool | None | Callable[[int, int], Any]


def bytes_callback(
    progress: ProgressArg, desc: str
) -> tuple[Callable[[int, int], Any] | None, Any]:
    """Turn a ``progress`` argument into a ``(done, total)`` callback and a closer.

    ``None`` shows a bar when stderr is a terminal, ``True`` always, ``False`` never; a callable
    is called as ``progress(done, total)``.
    """
    if callable(progress):
        return progress, None
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar


def iter_progress(progress: ProgressArg, total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar (or a no-op stand-in) for loops in Python code."""
    show = sys.stderr.isatty() if progress is None else bool(progress) and not callable(progress)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show, leave=False)
