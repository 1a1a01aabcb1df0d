"""Prometheus metrics at ``http://<metrics.bind_address>:<metrics.port>/metrics``.

Every value is read from the index (and the store's free space) when scraped, so the figures
cover every receiver and worker process, and every machine sharing a PostgreSQL index,
without per-process counters to merge.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node import __version__
from dicom_node.config import Settings
from dicom_node.errors import ConfigError
from dicom_node.index_outage import IndexOutage
from dicom_node.scp import certificate_in_use, certificate_validity
from storage.database import Index
from storage.filestore import FileStore
from storage.stats import index_counts

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

COUNT_TIMEOUT_S = 5.0  # seconds a scrape waits for the index's counts

logger = logging.getLogger(__name__)


class IndexCollector(Collector):
    def __init__(self, settings: Settings, index: Index, store: FileStore) -> None:
        self.settings = settings
        self.index = index
        self.store = store
        # One line when the index goes away and one when it is back, not one per scrape.
        self._outage = IndexOutage("metrics", logger)
        # One reader: scrapes of a hung index queue behind it instead of piling up threads.
        self._counts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")
        # Read once, as the node reads its certificate once, when it starts.
        certificate = certificate_in_use(settings)
        validity = certificate_validity(certificate) if certificate is not None else None
        self._certificate_expires = validity[1].timestamp() if validity else None

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("dicom_node", "This node: version and AE title")
        info.add_metric([], {"version": __version__, "ae_title": self.settings.node.ae_title})
        yield info
        if self._certificate_expires is not None:
            yield GaugeMetricFamily(
                "dicom_node_tls_certificate_expiry_timestamp_seconds",
                "When node.tls.certificate, as loaded at start, expires (Unix time)",
                value=self._certificate_expires,
            )
        # The disk first, and whatever the index does: a full disk and a lost index are
        # what an administrator most needs to see, and one must not hide the other.
        try:
            free = self.store.free_bytes()
        except OSError as exc:
            logger.warning("metrics: cannot read the store's free space: %s", exc)
        else:
            yield GaugeMetricFamily(
                "dicom_node_store_free_bytes", "Free space where images are stored", value=free
            )
        yield GaugeMetricFamily(
            "dicom_node_store_min_free_bytes",
            "Free space below which stores are refused (0xA700)",
            value=self.settings.storage.min_free_disk_mb * 1024 * 1024,
        )
        try:
            # Within Prometheus' scrape timeout (10 s by default): an index server that hangs
            # (connect timeout 10 s) failed the whole scrape, and index_up 0 was never seen.
            counts = self._counts.submit(index_counts, self.index).result(COUNT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            logger.warning("metrics: the index did not answer within %g s", COUNT_TIMEOUT_S)
            yield GaugeMetricFamily("dicom_node_index_up", "1 if the index answered", value=0)
            return
        except Exception as exc:  # an unreachable index is itself worth seeing
            if not self._outage.failed(exc):
                logger.warning("metrics: cannot read the index: %s", exc)
            yield GaugeMetricFamily("dicom_node_index_up", "1 if the index answered", value=0)
            return
        self._outage.succeeded()
        yield GaugeMetricFamily("dicom_node_index_up", "1 if the index answered", value=1)
        yield GaugeMetricFamily(
            "dicom_node_instances", "Images stored and indexed", value=counts.instances
        )
        for name, help_text, values in (
            ("dicom_node_series_versions", "Series versions by state", counts.series_versions),
            ("dicom_node_jobs", "Segmentation jobs by state", counts.jobs),
            ("dicom_node_deliveries", "SEG deliveries by state", counts.deliveries),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["state"])
            for state, n in values.items():
                family.add_metric([state], n)
            yield family
        yield GaugeMetricFamily(
            "dicom_node_jobs_failed_24h",
            "Jobs failed in the last 24 h",
            value=counts.jobs_failed_24h,
        )
        yield GaugeMetricFamily(
            "dicom_node_oldest_waiting_job_seconds",
            "How long the job waiting longest for a worker has waited (0: none waits)",
            value=counts.oldest_waiting_job_s or 0.0,
        )


class MetricsServer:
    """The metrics endpoint as a service component (started and stopped with the node)."""

    def __init__(self, settings: Settings, index: Index, store: FileStore) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(IndexCollector(settings, index, store))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        metrics = self.settings.metrics
        assert metrics.port is not None
        try:
            self._server, self._thread = start_http_server(
                metrics.port, addr=metrics.bind_address, registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {metrics.bind_address}:{metrics.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        logger.info(
            "metrics at http://%s:%d/metrics", metrics.bind_address, self._server.server_port
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
