"""pydicom's complaints about header values, summed up in one log line per series.

pydicom checks every value it reads or writes against its VR and, for each one that does
not conform, logs a line and raises a warning: a series whose UIDs are longer than DICOM's
64 characters gave 180 identical-looking lines while it was read and encoded, none saying
which series or job. Within ``summarised_value_warnings`` they are counted instead, and one
line with the job's tag says how many there were and of which kinds. The values themselves
are kept as sent.
"""

from __future__ import annotations

import contextlib
import logging
import re
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
_NUMBERS = re.compile(r"\(\d+\)")
_MOST_KINDS = 3


class _Counting(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not _VALUE_PROBLEM.match(message):
            return True
        self.kinds[_kind(message)] += 1
        return False


def _kind(message: str) -> str:
    # "The value length (72) exceeds ... VR UI. Please see <url> ..." -> one kind per VR.
    first = message.split(" Please see ", 1)[0].rstrip(".")
    return _NUMBERS.sub("(N)", first) if first.startswith("The value length") else first


@contextlib.contextmanager
def summarised_value_warnings(tag: str | Callable[[], str]) -> Iterator[None]:
    """Within: pydicom's value warnings counted, not logged one by one; after: one line,
    starting with ``tag`` (or what it returns then: a job's tag grows as it is read)."""
    counting = _Counting()
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_logger.addFilter(counting)
    try:
        with warnings.catch_warnings():
            # The same messages again, as warnings (logged by captureWarnings, or printed).
            warnings.filterwarnings("ignore", message=_VALUE_PROBLEM.pattern)
            yield
    finally:
        pydicom_logger.removeFilter(counting)
        if counting.kinds:
            kinds = "; ".join(
                f"{kind} ({count}x)" for kind, count in counting.kinds.most_common(_MOST_KINDS)
            )
            more = len(counting.kinds) - _MOST_KINDS
            logger.warning(
                "%s: %d header values do not conform to their VR, kept as sent: %s%s",
                tag if isinstance(tag, str) else tag(),
                sum(counting.kinds.values()),
                kinds,
                f"; and {more} more kinds" if more > 0 else "",
            )
