"""Progress bars for every long loop: tqdm's bar on a terminal, plain timed lines in a log file.

tqdm redraws its bar in place with carriage returns. Written to a file (a SLURM or nohup log, CI, `2> log`),
every redraw is appended to one ever-growing line, up to ten a second, which grep and log viewers show as one
endless line. So when stderr is not a terminal, each redraw becomes its own line, at most one every
LOG_INTERVAL_S seconds (and the last one when the loop ends).
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
_LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _BestEffort:
    """The stream tqdm draws on, for whom a failed write (a full disk under `2> log`, a closed pipe) only means no
    progress is shown: a progress bar never stops the work it reports on."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def fileno(self) -> int:  # tqdm's dynamic_ncols asks the terminal for its width
        return self._stream.fileno()

    @property
    def encoding(self) -> str | None:  # tqdm draws its Unicode bar only on a stream that can encode it
        return getattr(self._stream, "encoding", None)


class _OneLinePerRedraw(_BestEffort):
    """A text stream for tqdm that writes each redraw (`\\r` + text + padding) as one line of its own."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()  # the padding that blanks a longer previous redraw
        if text:
            super().write(text + "\n")


class _LogLines(tqdm):
    """tqdm for a log file: a count already written is not written again (`close` redraws the final state, which
    the last update may have drawn already)."""

    _drawn_n = None

    def display(self, msg=None, pos=None):
        if msg is None and self.n == self._drawn_n:
            return True
        self._drawn_n = self.n if msg is None else None
        return super().display(msg, pos)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, stream=None) -> tqdm:
    """A tqdm bar on `stream` (stderr): redrawn in place on a terminal, timed lines otherwise. Update its postfix
    with `set_postfix(..., refresh=False)` so that only `update` decides when a line is drawn."""
    stream = sys.stderr if stream is None else stream
    if not enabled or stream is None:  # None: Python's stderr when the process was started with it closed
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=_BestEffort(stream), dynamic_ncols=True)
    # maxinterval bounds tqdm's monitor thread, which would otherwise force a redraw every 10 s
    return _LogLines(total=total, desc=desc, unit=unit, file=_OneLinePerRedraw(stream), mininterval=LOG_INTERVAL_S,
                     maxinterval=LOG_INTERVAL_S, bar_format=_LOG_FORMAT, ascii=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
