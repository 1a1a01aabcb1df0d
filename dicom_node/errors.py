"""The project's one base exception and its few meaningful subclasses.

Kept free of third-party imports so ``inference`` and ``storage`` can share the base
without pulling in pydicom or pynetdicom.
"""

from __future__ import annotations

from typing import Any, Protocol


class DicomNodeError(Exception):
    """Base of every error dicom-node raises on purpose; the message says what to do next."""


class ConfigError(DicomNodeError):
    """config.yaml is unreadable or invalid; the message names the key and the fix."""


class StorageError(DicomNodeError):
    """The file store or the index cannot take more data (disk full, database unavailable)."""


class ModelError(DicomNodeError):
    """A model folder, zip or descriptor is missing parts or cannot be loaded."""


class SeriesError(DicomNodeError):
    """A series cannot be turned into a volume (mixed orientations, gaps, tilt, missing UIDs)."""


class DeliveryError(DicomNodeError):
    """Sending a result to a destination failed.

    ``retryable`` tells the outbox whether waiting and trying again can help;
    ``peer_down`` that the destination itself failed (unreachable, no association, the
    connection lost), not this one result: its other results wait as well.
    """

    def __init__(self, message: str, *, retryable: bool = True, peer_down: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.peer_down = peer_down


class _Validation(Protocol):
    """pydantic's ValidationError, as far as it is read here (no pydantic import)."""

    def errors(self, *, include_url: bool = True) -> list[Any]: ...


def validation_problems(exc: _Validation) -> str:
    """A pydantic ValidationError's errors, each as one line an administrator can act on:
    the key as written in the file (``rules[0].profile.compression``), what is wrong, and
    the value given where the reason does not quote it. Not pydantic's report, with its
    type codes and web links."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        if error["type"] == "extra_forbidden":
            message = "unknown key (misspelt, or in the wrong section?)"
        elif error["type"] == "missing":
            message = "required"
        elif error["type"] != "value_error" and isinstance(given, str | int | float):
            message += f" (given {given!r})"
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)
