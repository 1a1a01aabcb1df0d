"""The caller's label for inference's log lines (a job and its series, say), so that a line
such as a CUDA out-of-memory retry says which job it was about. Inference knows no jobs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_label: ContextVar[str] = ContextVar("inference_log_label", default="")


@contextmanager
def log_label(label: str) -> Iterator[None]:
    """Lines logged by inference within the block start with ``label``."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


def labelled(message: str) -> str:
    """``message`` (a %-format) with the current label in front, when there is one."""
    label = _label.get()
    # The label is text, not a format: a % in it must not consume the message's arguments.
    return f"{label.replace('%', '%%')}: {message}" if label else message


class LabelFilter(logging.Filter):
    """Puts the current label in front of every line of the logger it is added to: for a
    module whose lines all concern the labelled work (reading the series, encoding its SEG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and _label.get():
            record.msg = labelled(record.msg)
        return True
