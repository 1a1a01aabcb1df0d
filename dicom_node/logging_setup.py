"""Logging, configured once by the CLI: one line per event, to stderr and optionally a file."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import logging.handlers
import os
import sys
import time

from pynetdicom import _config as pynetdicom_config

from dicom_node.config import LoggingSettings
from dicom_node.errors import ConfigError

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


class _TextFormatter(logging.Formatter):
    """Local time with its UTC offset: without it, the hour that repeats when daylight
    saving time ends reads the same twice, and lines do not compare with the CLI's UTC."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        local = time.localtime(record.created)
        return (
            f"{time.strftime('%Y-%m-%d %H:%M:%S', local)},{int(record.msecs):03d}"
            f"{time.strftime('%z', local)}"
        )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str | None] = {
            # ISO 8601 with the offset, as log shippers parse it.
            "time": dt.datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat(timespec="milliseconds"),
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


class _JournalPriority(logging.Formatter):
    """Under systemd, stderr lines prefixed with their syslog priority (``<3>``), which
    journald reads and strips: every line was stored at info, and ``journalctl -p warning``
    showed none of the node's warnings."""

    # (level, syslog priority), highest first
    _PRIORITIES = (
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
    )

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self._PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{self.inner.format(record)}"


def _stderr_is_the_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the journal's stream."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


_RECOVERED = "logging.file %s written again; %d line(s) before this one are on stderr only"


class _LogFile(logging.handlers.WatchedFileHandler):
    """``logging.file``, reopened after logrotate, that never fails the code that logs.

    WatchedFileHandler raised into the caller when the rotated file could not be opened
    again (logrotate's ``create`` with another owner, a read-only volume): every association
    was aborted while negotiating. And a full disk printed a traceback to stderr per line.
    Now a file that cannot be written costs its lines (stderr has them all), with one line
    on stderr when it starts and one in the file when it ends.
    """

    def __init__(self, filename: os.PathLike[str]) -> None:
        super().__init__(filename, encoding="utf-8")
        self._lost = 0  # lines not written since the file could last be written

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)  # a bad message, not the file: as logging does
            return
        try:
            self.reopenIfNeeded()
            if self.stream is None:  # dropped after a failure, or reopening failed
                self.stream = self._open()
                self._statstream()
            if self._lost:
                text = self._recovered() + text
            self.stream.write(text)
            self.flush()
        except RecursionError:
            raise
        except Exception as exc:
            self._failed(exc)
        else:
            if self._lost:  # said once written, not per line tried on a disk still full
                self._to_stderr(logging.WARNING, _RECOVERED, self.baseFilename, self._lost)
            self._lost = 0

    def _failed(self, exc: Exception) -> None:
        if self.stream is not None:
            # Unwritten bytes would be retried with every line, and reopening (after a
            # rotation) flushes them first: drop them, open afresh at the next line.
            with contextlib.suppress(Exception):  # the same failure again, reported below
                self.stream.close()
            self.stream = None
        if not self._lost:
            self._to_stderr(
                logging.ERROR,
                "logging.file %s cannot be written (%s: %s): its lines are on stderr only "
                "until it can",
                self.baseFilename,
                type(exc).__name__,
                exc,
            )
        self._lost += 1

    def _recovered(self) -> str:
        notice = self._record(logging.WARNING, _RECOVERED, self.baseFilename, self._lost)
        # A line cut short by the full disk: start on a line of its own.
        return ("" if self._ends_a_line() else "\n") + self.format(notice) + self.terminator

    def _ends_a_line(self) -> bool:
        try:
            with open(self.baseFilename, "rb") as file:
                if file.seek(0, os.SEEK_END) == 0:
                    return True
                file.seek(-1, os.SEEK_END)
                return file.read(1) == b"\n"
        except OSError:
            return True

    def _record(self, level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.getLogger(__name__).makeRecord(__name__, level, __file__, 0, msg, args, None)

    def _to_stderr(self, level: int, msg: str, *args: object) -> None:
        with contextlib.suppress(Exception):  # stderr gone too: nowhere left to say it
            sys.stderr.write(self.format(self._record(level, msg, *args)) + self.terminator)
            sys.stderr.flush()


def configure_logging(settings: LoggingSettings) -> None:
    formatter: logging.Formatter = (
        _JsonFormatter() if settings.json_lines else _TextFormatter(FORMAT)
    )
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_JournalPriority(formatter) if _stderr_is_the_journal() else formatter)
    handlers: list[logging.Handler] = [console]
    if settings.file is not None:
        try:
            settings.file.parent.mkdir(parents=True, exist_ok=True)
            # logrotate-friendly. UTF-8 whatever the locale: under the C locale a line
            # holding a patient's name was lost ("--- Logging error ---").
            handlers.append(_LogFile(settings.file))
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
        if handler.formatter is None:
            handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.level)
    # Libraries' warnings (highdicom's on a source's odd Patient Name, ...) become log lines
    # at WARNING, in the log file and as JSON too, instead of raw lines on stderr only.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO; keep its association summaries only, unless
    # someone reads DEBUG: then its PDU and DIMSE lines too (its handlers are bound below).
    # logging.network_level sets it apart: DEBUG for the node without the PDU dumps, or the
    # dumps of one misbehaving sender without the node's own DEBUG lines.
    if settings.network_level is not None:
        network = logging.getLevelNamesMapping()[settings.network_level]
    else:
        network = logging.DEBUG if root.level <= logging.DEBUG else max(logging.WARNING, root.level)
    logging.getLogger("pynetdicom").setLevel(network)
    # Its per-PDU/DIMSE log handlers decode every message only to log it at INFO/DEBUG,
    # ~3% of a C-STORE's time: bind them only when those lines are read (before servers start).
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if network <= logging.INFO else "none"
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
