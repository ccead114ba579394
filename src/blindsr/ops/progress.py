"""Progress reporting, written once. Every ``progress`` argument of the library takes

- ``False``: silent;
- ``True``: a tqdm bar on stderr (count, rate and ETA);
- a callable ``report(done, total)``: called at the start and after every unit of work (the web page's bar).
  It may raise to stop the work: the exception propagates out of the pipeline (how a job is cancelled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = bool | Callable[[int, int], None]


class _Report:
    """The tqdm subset the library uses (``update``, ``close``), forwarding counts to ``report``."""

    def __init__(self, total: int, report: Callable[[int, int], None]):
        self.n, self.total, self._report = 0, total, report
        report(0, total)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report(self.n, self.total)

    def close(self) -> None:
        pass


def progress_bar(total: int, progress: Progress, desc: str) -> Any:
    """A bar over ``total`` units for ``progress`` (see the module docstring), or None when silent."""
    if callable(progress):
        return _Report(total, progress)
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
