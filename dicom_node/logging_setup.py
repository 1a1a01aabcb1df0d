"""Logging, configured once by the CLI: one line per event, to stderr and optionally a file."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys

from pynetdicom import _config as pynetdicom_config

from dicom_node.config import LoggingSettings
from dicom_node.errors import ConfigError

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str | None] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # What the text format appends below the line: the traceback of an unexpected error.
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line)


def configure_logging(settings: LoggingSettings) -> None:
    formatter: logging.Formatter = (
        _JsonFormatter() if settings.json_lines else logging.Formatter(FORMAT)
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file is not None:
        try:
            settings.file.parent.mkdir(parents=True, exist_ok=True)
            # logrotate-friendly. UTF-8 whatever the locale: under the C locale a line
            # holding a patient's name was lost ("--- Logging error ---").
            handlers.append(logging.handlers.WatchedFileHandler(settings.file, encoding="utf-8"))
        except OSError as exc:
            # Every command logs, the health check too: say which setting, not a traceback.
            raise ConfigError(
                f"logging.file {settings.file} cannot be written: {exc.strerror or exc}; "
                "choose a writable path or null (stderr only)"
            ) from exc
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.level)
    # Libraries' warnings (highdicom's on a source's odd Patient Name, ...) become log lines
    # at WARNING, in the log file and as JSON too, instead of raw lines on stderr only.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO; keep its association summaries only, unless
    # someone reads DEBUG: then its PDU and DIMSE lines too (its handlers are bound below).
    debug = root.level <= logging.DEBUG
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if debug else max(logging.WARNING, root.level)
    )
    # Its per-PDU/DIMSE log handlers decode every message only to log it at INFO/DEBUG,
    # ~3% of a C-STORE's time: bind them only when someone reads DEBUG (before servers start).
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if debug else "none"
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
