"""Progress bars that suit where the output goes.

On a terminal: an ordinary tqdm bar. Anywhere else (a log file, CI, a notebook's captured stderr): one
plain line every `LOG_EVERY_S` seconds at most, with no carriage returns, so a long job's log stays
readable (a bar redrawing in a file writes tens of thousands of `\\r`-lines).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_EVERY_S = 10.0


class _Lines:
    """A file for tqdm that turns redraws into newline-terminated lines, at most one per `LOG_EVERY_S`
    (forced redraws such as `set_postfix` included) plus the final one (100%)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = -float("inf")

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        now = time.monotonic()
        if s and (now - self.last >= LOG_EVERY_S or "100%" in s):
            self.last = now
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal; rate-limited plain lines elsewhere."""
    stream = sys.stderr
    if disable or stream is None:
        return tqdm(iterable, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.pop("leave", None)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_EVERY_S, maxinterval=LOG_EVERY_S * 6,
                ncols=100, ascii=True, leave=True, **kwargs)


def quiet_library_bars() -> None:
    """Turn off Hugging Face's own bars (weight loading, downloads) when stderr is not a terminal."""
    if sys.stderr is not None and not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
