"""State a node keeps while it runs for weeks must not grow with what it has received.

``benchmarks/soak.py`` drives a node for minutes and samples its processes; these tests
check, fast, what it found.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import test_committer
from sqlalchemy import text

from storage import instances
from storage.database import Index
from storage.instances import InstanceRecord, InstanceWriter


def _rec(series: str, i: int, association: int) -> InstanceRecord:
    # Each association its own port.
    return replace(test_committer._rec(series, i), peer_address=f"127.0.0.1:{40000 + association}")


def _series(first: int, count: int) -> list[InstanceRecord]:
    return [_rec(f"1.2.3.{n}", 1, n) for n in range(first, first + count)]


def test_the_index_writer_does_not_keep_every_series_it_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer remembered each series' receiving version for ever (~0.5 KB a series, in
    every receiver process): a node receiving thousands of series a day grew without end.
    It keeps the most recent ``KNOWN_SERIES`` (a small limit here, so that the test is
    fast); an image of a series it let go of is recorded as before, from the index."""
    monkeypatch.setattr(instances, "KNOWN_SERIES", 50)
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}", fsync=False)
    writer = InstanceWriter(index)
    for first in range(0, 1200, 100):
        writer.record(_series(first, 100))
        # Kept for ever, it held every series recorded so far (1,200 at the end).
        assert len(writer._known) == min(first + 100, 50)
    assert "1.2.3.1199" in writer._known and "1.2.3.0" not in writer._known

    # The first series, long let go of, and the last, still known: both stay right.
    (early,) = writer.record([_rec("1.2.3.0", 2, 0)])
    (recent,) = writer.record([_rec("1.2.3.1199", 2, 1199)])
    assert (early.version, early.replaced, early.new_version_opened) == (1, False, False)
    assert (recent.version, recent.replaced, recent.new_version_opened) == (1, False, False)
    with index.engine.connect() as conn:
        counts: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT s.series_instance_uid, v.instance_count FROM series_versions v "
                    "JOIN series s ON s.id = v.series_pk WHERE s.series_instance_uid IN "
                    "('1.2.3.0', '1.2.3.1199')"
                )
            ).all()
        )
        versions = conn.execute(text("SELECT COUNT(*) FROM series_versions")).scalar()
    assert counts == {"1.2.3.0": 2, "1.2.3.1199": 2}
    assert versions == 1200
    index.dispose()
