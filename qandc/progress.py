"""Progress bars: a tqdm bar on stderr when it is a terminal; off a terminal (logs, pipes, CI) no bar at all, so no
"\\r" or escape codes end up in a log — the plain stage lines (`qandc run`'s "[i/5] ...") say what is running."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, desc: str = "", enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, cleared when done, shown only when `enabled` and stderr is a terminal."""
    return tqdm(iterable, desc=desc, disable=not enabled or not sys.stderr.isatty(), leave=False, file=sys.stderr,
                **kwargs)
