"""Series completion: on release with the announced count, else after the quiet period."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from peers import NodeProcess, make_mr_series, storescu, wait_until
from pydicom import dcmread

pytestmark = pytest.mark.peers


def _announce(
    paths: list[Path], count: int, keyword: str = "NumberOfSeriesRelatedInstances"
) -> None:
    for path in paths:
        ds = dcmread(path)
        setattr(ds, keyword, count)
        ds.save_as(path)


def _state(node: NodeProcess, uid: str) -> dict[str, object]:
    (row,) = node.query(
        "SELECT v.state, v.instance_count, v.completion_reason FROM series_versions v "
        "JOIN series s ON s.id = v.series_pk WHERE s.series_instance_uid = ?",
        (uid,),
    )
    return dict(row)


def test_release_with_the_announced_count_completes_at_once(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(quiet_period_s=600)  # only the release can complete it in time
    announced = make_mr_series(tmp_path / "a", 6, seed=1)
    _announce(announced.paths, 6)
    silent = make_mr_series(tmp_path / "b", 6, seed=2)
    short = make_mr_series(tmp_path / "c", 6, seed=3)
    _announce(short.paths[:5], 6)  # announces 6, sends 5
    # Images in Acquisition counts one acquisition: a series of two, sent one per
    # association, must not complete when the first association is released.
    first_acquisition = make_mr_series(tmp_path / "d", 3, seed=5)
    _announce(first_acquisition.paths, 3, "ImagesInAcquisition")
    sent = storescu(node.port, [tmp_path / "a", tmp_path / "b", *short.paths[:5], tmp_path / "d"])
    assert sent.returncode == 0, sent.stdout + sent.stderr

    wait_until(
        lambda: _state(node, announced.series_instance_uid)["state"] == "complete",
        timeout_s=30,
        what="completion on release",
    )
    done = _state(node, announced.series_instance_uid)
    assert done["instance_count"] == 6
    assert "association released with 6/6 images" in str(done["completion_reason"])
    # Neither the unannounced nor the incomplete series is complete: they wait out the quiet period.
    assert _state(node, silent.series_instance_uid)["state"] == "receiving"
    assert _state(node, short.series_instance_uid)["state"] == "receiving"
    assert _state(node, first_acquisition.series_instance_uid)["state"] == "receiving"
    assert "version 1 complete: 6 instances, association released" in node.log_text()


def test_quiet_period_completes_and_survives_a_restart(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(quiet_period_s=8)
    series = make_mr_series(tmp_path / "s", 3)
    assert storescu(node.port, [tmp_path / "s"]).returncode == 0
    assert _state(node, series.series_instance_uid)["state"] == "receiving"
    node.kill9()  # before the quiet period ends: the pending completion is in the index
    node.start()
    wait_until(
        lambda: _state(node, series.series_instance_uid)["state"] == "complete",
        timeout_s=30,
        what="completion after restart",
    )
    assert "quiet for 8 s" in str(_state(node, series.series_instance_uid)["completion_reason"])


def test_quiet_period_with_fewer_images_than_announced_says_so(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A sender that stops early (an aborted transfer) still gets its series completed, but
    the index and a warning say how many of the announced images came."""
    node = node_factory(quiet_period_s=3)
    short = make_mr_series(tmp_path / "c", 6, seed=3)
    _announce(short.paths[:4], 6)
    whole = make_mr_series(tmp_path / "w", 3, seed=4)
    _announce(whole.paths, 3)
    assert storescu(node.port, [*short.paths[:4], *whole.paths]).returncode == 0

    wait_until(
        lambda: _state(node, short.series_instance_uid)["state"] == "complete",
        timeout_s=30,
        what="completion after the quiet period",
    )
    reason = str(_state(node, short.series_instance_uid)["completion_reason"])
    assert reason == "quiet for 3 s, 4 of 6 announced images", reason
    log = node.log_text()
    assert (
        f"series {short.series_instance_uid} version 1 complete with 4 of the 6 images "
        "its headers announce" in log
    ), log[-3000:]
    wait_until(
        lambda: _state(node, whole.series_instance_uid)["state"] == "complete",
        timeout_s=30,
        what="completion of the whole series (on release)",
    )
    assert "announced" not in str(_state(node, whole.series_instance_uid)["completion_reason"])
    log = node.log_text()  # read again: it holds the whole series' completion now
    assert f"series {whole.series_instance_uid} (study " in log
    assert f"series {whole.series_instance_uid} version 1 complete with" not in log
