"""The service behind ``dicom-node serve``: receiver, completion and the job pipeline as one.

SIGTERM (or Ctrl-C): stop accepting associations, let in-flight C-STOREs finish and be
acknowledged, stop the background parts, exit 0.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import pwd
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from dicom_node import __version__
from dicom_node.child_process import Restarts, die_with_parent
from dicom_node.completion import CompletionListener, CompletionMonitor
from dicom_node.config import Settings
from dicom_node.errors import ConfigError, DeliveryError, StorageError
from dicom_node.index_outage import log_failure
from dicom_node.logging_setup import configure_logging
from dicom_node.periodic import Periodic
from dicom_node.receive import Receiver
from dicom_node.scp import (
    RunningSCP,
    certificate_in_use,
    check_certificate_dates,
    start_scp,
    warn_of_certificate_expiry,
)
from storage.database import Index, warn_of_clock_skew
from storage.filestore import REMOVING_DIR, RESULTS_DIR, FileStore
from storage.instances import CompletedSeries
from storage.retention import finish_removals

logger = logging.getLogger(__name__)

STORE_DRAIN_TIMEOUT_S = 30.0
# How often a running node looks at its certificate's expiry (and says so, when near).
CERTIFICATE_CHECK_INTERVAL_S = 12 * 3600.0


class Component(Protocol):
    """A background part of the service (scheduler, workers, outbox)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


ComponentFactory = Callable[["Service"], Component]


def open_store(settings: Settings) -> tuple[Index, FileStore]:
    storage = settings.storage
    if storage.data_dir.exists() and not storage.data_dir.is_dir():
        raise StorageError(f"storage.data_dir {storage.data_dir} is a file, not a folder")
    try:
        # The folders first: an index folder that cannot be made fails with its cause.
        storage.data_dir.mkdir(parents=True, exist_ok=True)
        store = FileStore(storage.store_dir, storage.min_free_disk_mb, fsync=storage.fsync)
    except OSError as exc:
        raise StorageError(
            f"cannot use storage.data_dir {storage.data_dir}: {exc.strerror or exc}"
        ) from exc
    index = Index(storage.effective_database_url, fsync=storage.fsync)
    return index, store


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        completion_listeners: list[CompletionListener] | None = None,
        components: list[ComponentFactory] | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.settings = settings
        log_start(settings, config_path)
        self.index, self.store = open_store(settings)
        check_writable(self.store, settings)
        log_storage(self.store, settings)
        log_inference(settings)
        warn_of_clock_skew(self.index)  # machines sharing a PostgreSQL index compare clocks
        swept = self.store.sweep_temporaries()
        if swept:
            logger.info("removed %d partial files left by an earlier crash", swept)
        finish_removals(self.index, self.store)  # a prune or delete the crash cut short
        self.receiver = Receiver(
            self.store,
            self.index,
            settings.node.max_associations,
            index_timeout_s=settings.storage.index_timeout_s,
        )
        self.completion = CompletionMonitor(self.index, settings.completion, completion_listeners)
        self._component_factories = list(components or [])
        self.components: list[Component] = []
        self._scp: RunningSCP | None = None
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._restarts: list[Restarts] = []
        self._stopped = threading.Event()
        self._certificate_check: Periodic | None = None

    def start(self) -> None:
        _check_client_tls(self.settings)
        certificate_expires = check_certificate_dates(self.settings)
        certificate = certificate_in_use(self.settings)
        if certificate_expires is not None and certificate is not None:
            self._certificate_check = Periodic(
                "certificate-expiry",
                functools.partial(warn_of_certificate_expiry, certificate, certificate_expires),
                CERTIFICATE_CHECK_INTERVAL_S,
                failure="certificate expiry check failed",
                log=logger,
            )
            self._certificate_check.start()
        processes = self.settings.node.receiver_processes
        # Each process takes the full max_associations: which process accepts a connection
        # is a race, so an even split could refuse senders while others had room.
        self._scp = start_scp(self.settings, self.receiver, shared=processes > 1)
        if processes > 1:
            self._children = [self._spawn_receiver(number) for number in range(1, processes)]
            self._restarts = [Restarts(started=time.monotonic()) for _ in self._children]
            logger.info(
                "%d receiver processes share the listening port %d",
                processes,
                self.settings.node.port,
            )
        self.completion.start()
        for factory in self._component_factories:
            component = factory(self)
            component.start()
            self.components.append(component)
        settle_heap()

    def _spawn_receiver(self, number: int) -> multiprocessing.process.BaseProcess:
        assert self._scp is not None
        child = multiprocessing.get_context("spawn").Process(
            target=_receiver_process,
            args=(self.settings.model_dump_json(), self._scp.sockets, os.getpid()),
            name=f"receiver-{number}",
            daemon=False,
        )
        child.start()
        return child

    def replace_dead_receivers(self) -> None:
        """Start again a receiver process that died (killed, out of memory). The others
        serve meanwhile, with fewer associations in all; its senders saw their association
        end, and every image it acknowledged is stored."""
        if self._stopped.is_set():
            return
        for number, (child, restarts) in enumerate(
            zip(self._children, self._restarts, strict=True), start=1
        ):
            if child.is_alive():
                continue
            now = time.monotonic()
            if restarts.due is None:  # its exit not handled yet
                delay = restarts.exited(now)
                if delay:
                    logger.error(
                        "receiver process %s exited (code %s) %s; starting it again in %.0f s",
                        child.name,
                        child.exitcode,
                        restarts.in_a_row(),
                        delay,
                    )
                else:
                    logger.warning(
                        "receiver process %s exited (code %s); starting a new one",
                        child.name,
                        child.exitcode,
                    )
                if child.pid is not None:
                    # Off this loop: the sweep lists every series folder of the store.
                    threading.Thread(
                        target=self._sweep_after, args=(child.name, child.pid), daemon=True
                    ).start()
            if now >= (restarts.due or 0.0):
                self._children[number - 1] = self._spawn_receiver(number)
                restarts.restarted(now)

    def _sweep_after(self, name: str, pid: int) -> None:
        """Remove what a dead receiver process was writing (the others write on)."""
        try:
            swept = self.store.sweep_temporaries(pid)
        except OSError as exc:
            logger.warning("could not remove partial files of %s: %s", name, exc)
            return
        if swept:
            logger.info("removed %d partial files of receiver process %s", swept, name)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("stopping: no new associations; finishing in-flight stores")
        for child in self._children:
            if child.pid is not None and child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        if self._scp is not None:
            _drain(self._scp, self.receiver)
        for child in self._children:
            child.join(timeout=STORE_DRAIN_TIMEOUT_S + 5)
        for component in reversed(self.components):
            try:
                component.stop()
            except Exception as exc:  # index away: the next start releases interrupted jobs
                log_failure(logger, exc, "error while stopping %s", type(component).__name__)
        if self._certificate_check is not None:
            self._certificate_check.stop()
        self.completion.stop()
        self.index.dispose()
        logger.info("stopped")

    def run_until_signal(self) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully."""
        wake = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            wake.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            self.start()
        except BaseException:
            # What did start stops with it: a worker process spawned just before would
            # otherwise outlive the failed start and die on its own, with a traceback.
            self.stop()
            raise
        while not wake.wait(1.0):
            self.replace_dead_receivers()
        self.stop()
        exit_leaving_hung_commits(self.receiver.close())


def log_start(settings: Settings, config_path: Path | None) -> None:
    """The first log line: which release, as whom, with which configuration, listening
    where. Logged before anything can fail, so that a failed start says what it tried."""
    node = settings.node
    logger.info(
        "dicom-node %s starting (pid %d, user %s), configuration %s: AE %s on %s:%d%s",
        __version__,
        os.getpid(),
        _user_name(),
        config_path.resolve() if config_path is not None else "none (built-in defaults)",
        node.ae_title,
        node.bind_address,
        node.port,
        f" and DICOM TLS on port {node.tls.port}" if node.tls.enabled else "",
    )


def log_storage(store: FileStore, settings: Settings) -> None:
    logger.info(
        "storage: files in %s (%s MB free, storage.min_free_disk_mb %d), index %s",
        store.root,
        f"{store.free_bytes() // 2**20:,}",
        settings.storage.min_free_disk_mb,
        shown_url(settings.storage.effective_database_url),
    )


def log_inference(settings: Settings) -> None:
    """Workers, models and rules; a configured models folder that is not there (a typo, a
    volume not mounted) is warned of: only the built-in models would run."""
    from inference.model_store import list_models  # kept out of receiver processes

    models_dir = settings.models_dir
    there = models_dir.is_dir()
    workers = settings.workers.processes
    logger.info(
        "inference: %s; models in %s%s: %s; %d routing rule(s), %d peer(s)",
        f"{workers} worker process(es), inference.device {settings.inference.device}"
        if workers
        else "no inference workers (workers.processes 0)",
        models_dir,
        "" if there else " (none installed)",
        ", ".join(f"{m.name} (built-in)" if m.builtin else m.name for m in list_models(models_dir))
        or "none",
        len(settings.rules),
        len(settings.peers),
    )
    if settings.inference.models_dir is not None and not there:
        logger.warning(
            "inference.models_dir %s is not a folder (a typo, a volume not mounted?): "
            "only the built-in models are available",
            models_dir,
        )


def shown_url(url: str) -> str:
    """A database URL as logged: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container's user id with no name
        return str(os.geteuid())


def check_writable(store: FileStore, settings: Settings) -> None:
    """Refuse to start on a store the node cannot write in (its folders made by another
    user, e.g. root running scripts/run-node.sh before a service user took over): it would
    answer C-ECHO and the health check, and refuse every image with 0xA700."""
    folders = [store.root, store.root / RESULTS_DIR, store.root / REMOVING_DIR]
    for folder in folders[:1] + [f for f in folders[1:] if f.is_dir()]:
        try:
            with tempfile.TemporaryFile(dir=folder):  # unnamed where the OS can: nothing left
                pass
        except OSError as exc:
            user = _user_name()
            raise StorageError(
                f"cannot write in {folder}: {exc.strerror or exc}; the node runs as user "
                f"{user}, which needs to own its data (chown -R {user} "
                f"{settings.storage.data_dir})"
            ) from exc


def _check_client_tls(settings: Settings) -> None:
    """The certificate, key and CA for peers with ``tls: true`` load: found at start, not at
    each delivery (retried for hours) after the first series."""
    tls_peers = [peer.name for peer in settings.peers if peer.tls]
    if not tls_peers:
        return
    from dicom_node.send import client_tls

    try:
        client_tls(settings)
    except DeliveryError as exc:
        raise ConfigError(f"{exc} (needed to send to {', '.join(tls_peers)})") from exc


def settle_heap() -> None:
    """Keep the garbage collector off what start-up made (modules, settings, engines): it
    lives as long as the process. Otherwise each full collection scans all of it again: one
    took ~55 ms of a fresh receiver's first association, ~0.7 ms per image of 75."""
    gc.collect()
    gc.freeze()


def exit_leaving_hung_commits(count: int) -> None:
    """Exit now if index transactions still hang: Python would wait for them at exit, so a
    stalled database server would keep a stopped node from ever exiting."""
    if not count:
        return
    logger.warning(
        "exiting with %d store(s) still waiting for the index; they were refused (0xA700) "
        "and their files kept: `dicom-node store check` lists any the index never recorded",
        count,
    )
    logging.shutdown()
    os._exit(0)


def _drain(scp: RunningSCP, receiver: Receiver) -> None:
    """Stop accepting, let in-flight C-STOREs finish and be answered, then abort the rest."""
    scp.stop_accepting()
    if not receiver.wait_idle(STORE_DRAIN_TIMEOUT_S):
        logger.warning("in-flight stores did not finish within %.0f s", STORE_DRAIN_TIMEOUT_S)
    scp.abort_remaining()


def _receiver_process(settings_json: str, sockets: list[socket.socket], parent_pid: int) -> None:
    """An extra receiving process: the parent's listening sockets, same store and index."""
    die_with_parent(parent_pid)
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.logging)
    index, store = open_store(settings)
    receiver = Receiver(
        store,
        index,
        settings.node.max_associations,
        index_timeout_s=settings.storage.index_timeout_s,
    )
    settle_heap()
    scp = start_scp(settings, receiver, adopt=sockets)
    wake = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: wake.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    while not wake.wait(1.0):
        pass
    _drain(scp, receiver)
    index.dispose()
    exit_leaving_hung_commits(receiver.close())


def default_components(
    settings: Settings,
) -> tuple[list[CompletionListener], list[ComponentFactory]]:
    """What ``serve`` runs besides the receiver: scheduler, workers, outbox, metrics,
    retention."""
    from dicom_node.outbox import Outbox
    from dicom_node.scheduler import Scheduler
    from dicom_node.worker import WorkerPool

    holder: dict[str, Any] = {}

    def scheduler(service: Service) -> Component:
        def wake_workers() -> None:
            if "pool" in holder:
                holder["pool"].work_available.set()

        made = Scheduler(service.settings, service.index, on_queued=wake_workers)
        holder["scheduler"] = made
        return made

    def wake_scheduler(_: CompletedSeries) -> None:
        if "scheduler" in holder:
            holder["scheduler"].wake()

    def workers(service: Service) -> Component:
        pool = WorkerPool(service.settings, service.index, service.settings.workers.processes)
        holder["pool"] = pool
        return pool

    def outbox(service: Service) -> Component:
        pool = holder.get("pool")
        wake = pool.results_ready if pool is not None else None
        return Outbox(service.settings, service.index, service.store, wake)

    def metrics(service: Service) -> Component:
        from dicom_node.metrics import MetricsServer

        return MetricsServer(service.settings, service.index, service.store)

    factories: list[ComponentFactory] = [scheduler, outbox]
    if settings.workers.processes:
        factories.insert(1, workers)

    def retention(service: Service) -> Component:
        from dicom_node.retention import RetentionSweeper

        return RetentionSweeper(service.settings, service.index, service.store)

    if settings.metrics.port is not None:
        factories.append(metrics)
    if settings.storage.retention is not None:
        factories.append(retention)
    return [wake_scheduler], factories
