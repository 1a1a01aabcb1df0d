"""The project's one base exception and its few meaningful subclasses.

Kept free of third-party imports so ``inference`` and ``storage`` can share the base
without pulling in pydicom or pynetdicom.
"""

from __future__ import annotations


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

    ``retryable`` tells the outbox whether waiting and trying again can help.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
