"""pydicom's complaints about header values, summed up in a log line per series.

pydicom checks every value it reads or writes against its VR and, for each one that does
not conform, logs a line and raises a warning: a series whose UIDs are longer than DICOM's
64 characters gave 180 identical-looking lines while it was read and encoded, none saying
which series or job. Within ``summarised_value_warnings`` they are counted instead, and one
line with the job's tag says how many there were and of which kinds. The values themselves
are kept as sent. So do its complaints about text its Specific Character Set does not
describe, in a line of their own: a misspelled character set ("ISO-IR 100") gave some 75
lines per image of a job, one per text value pydicom decoded.

``quiet_value_warnings`` keeps pydicom's lines from the log in one thread: the index reads
header values of every image received, and a line per value and image said nothing a job
does not say once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

# The messages of pydicom.valuerep's value checks (pydicom 3).
_VALUE_PROBLEM = re.compile(
    r"The value length \(\d+\) exceeds|Invalid value|The PN component length"
    r"|The number of PN components|Value \".*\" is not valid for elements with a VR"
    r"|A value of type '\w+' cannot be assigned|Unable to convert non-conformant",
    re.DOTALL,
)
# The messages of pydicom.charset on text its Specific Character Set does not describe
# (pydicom 3). Not "Failed to encode value": that changes what is written.
_CHARSET_PROBLEM = re.compile(
    r"Incorrect value for Specific Character Set|Unknown encoding '"
    r"|Failed to decode byte string|Found unknown escape sequence"
    r"|Value '.*' (for Specific Character Set does not allow|cannot be used as code extension)",
    re.DOTALL,
)
_NUMBERS = re.compile(r"\(\d+\)")
_MOST_KINDS = 3


class _Counting(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self.charset_kinds: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.count(record.getMessage())

    def count(self, message: str) -> bool:
        """Whether ``message`` is one of the complaints counted here (and now counted)."""
        if _VALUE_PROBLEM.match(message):
            self.kinds[_kind(message)] += 1
        elif _CHARSET_PROBLEM.match(message):
            self.charset_kinds[message] += 1
        else:
            return False
        return True


class _QuietInItsThread(logging.Filter):
    """Drops pydicom's lines in a thread within ``quiet_value_warnings``, handing them to
    it; every other thread's pass (records are filtered in the thread that logs them)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        heard: list[str] | None = getattr(self.local, "heard", None)
        if heard is None:
            return True
        message = record.getMessage()
        heard.append(message)
        # This filter comes before a summary's (added for good, once): the line it drops
        # would not reach the summary of this thread's job, which must still count it.
        counting: _Counting | None = getattr(self.local, "counting", None)
        if counting is not None:
            counting.count(message)
        return False


_QUIET = _QuietInItsThread()
_PYDICOM_LOGGER = logging.getLogger("pydicom")
# For good, first: it passes every line of a thread outside quiet_value_warnings.
_PYDICOM_LOGGER.addFilter(_QUIET)


@contextlib.contextmanager
def quiet_value_warnings() -> Iterator[list[str]]:
    """Within, in this thread: pydicom's lines are not logged but collected in the list
    yielded (pydicom's warnings, shown once per place by Python, are left as they are)."""
    outer = getattr(_QUIET.local, "heard", None)
    heard: list[str] = []
    _QUIET.local.heard = heard
    try:
        yield heard
    finally:
        _QUIET.local.heard = outer


def _kind(message: str) -> str:
    # "The value length (72) exceeds ... VR UI. Please see <url> ..." -> one kind per VR.
    first = message.split(" Please see ", 1)[0].rstrip(".")
    return _NUMBERS.sub("(N)", first) if first.startswith("The value length") else first


@contextlib.contextmanager
def summarised_value_warnings(tag: str | Callable[[], str]) -> Iterator[None]:
    """Within: pydicom's value warnings counted, not logged one by one; after: one line for
    values, one for character sets, starting with ``tag`` (or what it returns then: a job's
    tag grows as it is read)."""
    counting = _Counting()
    _PYDICOM_LOGGER.addFilter(counting)
    outer = getattr(_QUIET.local, "counting", None)
    _QUIET.local.counting = counting  # what this thread's quiet reads drop, it counts
    try:
        with warnings.catch_warnings():
            # The same messages again, as warnings (logged by captureWarnings, or printed).
            warnings.filterwarnings("ignore", message=_VALUE_PROBLEM.pattern)
            warnings.filterwarnings("ignore", message=_CHARSET_PROBLEM.pattern)
            yield
    finally:
        _QUIET.local.counting = outer
        _PYDICOM_LOGGER.removeFilter(counting)
        name = tag if isinstance(tag, str) else tag()
        if counting.kinds:
            logger.warning(
                "%s: %d header values do not conform to their VR, kept as sent: %s",
                name,
                sum(counting.kinds.values()),
                _most_common(counting.kinds),
            )
        if counting.charset_kinds:
            logger.warning(
                "%s: %d reads of header text that does not match its Specific Character Set,"
                " kept as sent: %s",
                name,
                sum(counting.charset_kinds.values()),
                _most_common(counting.charset_kinds),
            )


def _most_common(kinds: Counter[str]) -> str:
    listed = "; ".join(f"{kind} ({count}x)" for kind, count in kinds.most_common(_MOST_KINDS))
    more = len(kinds) - _MOST_KINDS
    return listed + (f"; and {more} more kinds" if more > 0 else "")
