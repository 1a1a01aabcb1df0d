"""pynetdicom's per-message log handlers are bound only when the node logs at DEBUG."""

from __future__ import annotations

import logging

import pytest
from pynetdicom import _config as pynetdicom_config

from dicom_node.config import LoggingSettings
from dicom_node.logging_setup import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in ("pynetdicom", "alembic", "highdicom"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", pynetdicom_config.LOG_HANDLER_LEVEL)


@pytest.mark.parametrize(
    ("level", "handlers"),
    [("INFO", "none"), ("WARNING", "none"), ("DEBUG", "standard")],
)
def test_pynetdicom_message_handlers_follow_the_log_level(level: str, handlers: str) -> None:
    configure_logging(LoggingSettings(level=level))  # type: ignore[arg-type]
    assert handlers == pynetdicom_config.LOG_HANDLER_LEVEL
