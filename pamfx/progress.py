"""Progress bars: one place that decides how pamfx shows progress (tqdm)."""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar that shows only when asked for and when its output is a terminal.

    On a non-interactive output (a log file, a pipe) tqdm's carriage-return updates would pile up
    into one line per refresh, megabytes over a long run; there the bar is disabled (tqdm's
    ``disable=None``: off unless the stream is a TTY). Bars are transient (``leave=False``) unless
    ``leave`` is given.
    """
    options.setdefault("leave", False)
    return tqdm(iterable, disable=None if enabled else True, **options)
