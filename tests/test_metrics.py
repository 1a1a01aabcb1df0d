"""The Prometheus endpoint of a running node, scraped over HTTP and parsed by prometheus_client."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import NodeFactory
from peers import DICOM_NODE, free_port, make_mr_series, storescu, wait_until
from prometheus_client.parser import text_string_to_metric_families

from dicom_node import __version__

pytestmark = pytest.mark.peers


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_the_index_holds(node_factory: NodeFactory, tmp_path: Path) -> None:
    port = free_port()
    node = node_factory(
        overrides={
            "metrics": {"port": port},
            "completion": {"quiet_period_s": 1},
            "storage": {"min_free_disk_mb": 1},  # reported in bytes
        }
    )
    node.wait_for_log(f"metrics at http://127.0.0.1:{port}/metrics")
    before = _scrape(port)
    assert before[("dicom_node_instances", ())] == 0
    assert before[("dicom_node_index_up", ())] == 1

    series = make_mr_series(tmp_path / "series", 5)
    sent = storescu(node.port, [tmp_path / "series"])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(
        lambda: _scrape(port)[("dicom_node_series_versions", (("state", "complete"),))] == 1,
        timeout_s=30,
        what="the series complete in the metrics",
    )
    metrics = _scrape(port)
    assert metrics[("dicom_node_instances", ())] == len(series.paths) == 5
    assert metrics[("dicom_node_series_versions", (("state", "receiving"),))] == 0
    # No rule matches in the test config: nothing queued, every state reported as 0.
    for state in ("queued", "running", "succeeded", "failed", "retry_wait"):
        assert metrics[("dicom_node_jobs", (("state", state),))] == 0
    for state in ("pending", "sending", "delivered", "dead"):
        assert metrics[("dicom_node_deliveries", (("state", state),))] == 0
    assert metrics[("dicom_node_oldest_waiting_job_seconds", ())] == 0  # none waits
    assert metrics[("dicom_node_store_free_bytes", ())] > 0
    assert metrics[("dicom_node_store_min_free_bytes", ())] == 1024 * 1024
    info = (("ae_title", node.ae_title), ("version", __version__))
    assert metrics[("dicom_node_info", info)] == 1
    assert node.cli_json("status", "--json")["instances"] == 5


def test_an_unreachable_index_reads_as_down(tmp_path: Path) -> None:
    import shutil

    from dicom_node.config import Settings
    from dicom_node.metrics import IndexCollector
    from storage.database import Index
    from storage.filestore import FileStore

    folder = tmp_path / "index"
    folder.mkdir()
    index = Index(f"sqlite:///{folder / 'index.sqlite'}")
    collector = IndexCollector(Settings(), index, FileStore(tmp_path / "store", 0))
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert samples["dicom_node_index_up"] == 1 and samples["dicom_node_instances"] == 0
    # The index's disk goes away: no connection can be opened any more.
    index.dispose()
    shutil.rmtree(folder)
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert samples["dicom_node_index_up"] == 0
    assert "dicom_node_instances" not in samples
    assert samples["dicom_node_info"] == 1
    # The disk is still reported: a full disk and a lost index often come together.
    assert samples["dicom_node_store_free_bytes"] > 0
    assert "dicom_node_store_min_free_bytes" in samples


def test_a_store_that_cannot_be_read_leaves_the_other_metrics(tmp_path: Path) -> None:
    """The store's free space read outside any guard: a store folder gone (an unmounted
    volume) made every scrape fail (HTTP 500), index_up included."""
    import shutil

    from dicom_node.config import Settings
    from dicom_node.metrics import IndexCollector
    from storage.database import Index
    from storage.filestore import FileStore

    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    collector = IndexCollector(Settings(), index, FileStore(tmp_path / "store", 0))
    shutil.rmtree(tmp_path / "store")
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert samples["dicom_node_index_up"] == 1
    assert "dicom_node_store_free_bytes" not in samples
    index.dispose()


def test_a_metrics_port_in_use_stops_the_start_cleanly(tmp_path: Path) -> None:
    """The port is taken once the DICOM port listens and a worker process is running: what
    started stops again (before, the worker outlived the node and died with a traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "node": {"port": free_port(), "bind_address": "127.0.0.1"},
                    "storage": {"data_dir": "var", "min_free_disk_mb": 0},
                    "workers": {"processes": 1},
                    "metrics": {"port": port},
                }
            )
        )
        run = subprocess.run(
            [str(DICOM_NODE), "-c", str(config), "serve"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2, run.stderr
    assert f"error: cannot serve metrics on 127.0.0.1:{port}" in run.stderr, run.stderr
    assert "worker-1" in run.stderr and "dicom_node.service: stopped" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_an_index_that_hangs_reads_as_down_within_the_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL server that accepts but never answers held the scrape for the connect
    timeout (10 s, Prometheus' own scrape timeout): the scrape failed as a whole, and the
    alert on index_up == 0 never fired."""
    import threading

    from dicom_node import metrics
    from dicom_node.config import Settings
    from storage.database import Index
    from storage.filestore import FileStore

    release = threading.Event()
    monkeypatch.setattr(metrics, "COUNT_TIMEOUT_S", 0.2)
    monkeypatch.setattr(metrics, "index_counts", lambda index: release.wait(10))
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    collector = metrics.IndexCollector(Settings(), index, FileStore(tmp_path / "store", 0))
    try:
        samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    finally:
        release.set()
    assert samples["dicom_node_index_up"] == 0
    assert samples["dicom_node_store_free_bytes"] > 0
    index.dispose()
