"""`dicom-node store check [--repair] [--forget-missing]`: the file store against the index.

Real node (storescu sends), real SQLite index and file store, the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeFactory
from peers import NodeProcess, make_mr_series, storescu, wait_series_complete, wait_until
from sqlalchemy import select

from dicom_node.store_check import repair_store
from storage.consistency import check_store
from storage.database import Index
from storage.filestore import FileStore
from storage.models import SeriesVersion

RULES = {
    "rules": [{"name": "mr", "match": {"modality": ["MR"]}, "model": "demo"}],
    "completion": {"quiet_period_s": 1},
}


def _check(node: NodeProcess, *args: str) -> tuple[int, dict[str, Any]]:
    result = node.cli("store", "check", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def _send(node: NodeProcess, folder: Path, count: int, description: str) -> str:
    series = make_mr_series(folder, count, series_description=description)
    assert storescu(node.port, [folder]).returncode == 0
    return series.series_instance_uid


def _age(paths: list[Path], seconds: float = 3600) -> None:
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


@pytest.mark.peers
def test_a_store_that_matches_its_index_is_consistent_and_damage_is_reported_and_mended(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(overrides=RULES)
    kept = _send(node, tmp_path / "a", 3, "kept")
    wait_series_complete(node, kept, count=3)
    assert node.stop() == 0
    code, clean = _check(node)
    assert code == 0 and clean["consistent"] is True
    assert clean["report"]["instances_checked"] == 3

    # The index goes back to a backup taken now; a second series arrives after it.
    backup = tmp_path / "index-backup.sqlite"
    shutil.copyfile(node.index_path, backup)
    node.start()
    late = _send(node, tmp_path / "b", 4, "after the backup")
    wait_series_complete(node, late, count=4)
    assert node.stop() == 0
    for leftover in node.data_dir.glob("index.sqlite*"):
        leftover.unlink()
    shutil.copyfile(backup, node.index_path)

    # And the disk loses one image, another changes size, a crash leaves a partial file,
    # a pruned job's SEG is left behind, and a file that is not DICOM sits in a series folder.
    kept_files = sorted(p for p in node.store_dir.rglob("*.dcm") if kept in str(p))
    kept_files[0].unlink()
    with kept_files[1].open("ab") as extra:
        extra.write(b"\0\0")
    folder = kept_files[2].parent
    partial = folder / ".tmp-0123456789abcdef"
    partial.write_bytes(b"DICM")
    stray_seg = node.store_dir / "results" / "999" / "1.2.3.dcm"
    stray_seg.parent.mkdir(parents=True)
    stray_seg.write_bytes(b"SEG")
    junk = folder / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    late_files = sorted(p for p in node.store_dir.rglob("*.dcm") if late in str(p))
    assert len(late_files) == 4

    # Young files are in flight for a running node: left out until the grace period passes.
    code, young = _check(node)
    assert code == 1 and young["report"]["recent"] == 4 + 3
    assert young["report"]["unreferenced_images"] == young["report"]["temporaries"] == []
    _age([partial, stray_seg, junk, *late_files])

    code, damaged = _check(node)
    report = damaged["report"]
    assert code == 1 and damaged["consistent"] is False
    assert report["instances_checked"] == 3
    problems = {m["path"]: m["problem"] for m in report["missing"]}
    assert problems == {
        node.relative_to_store(kept_files[0]): "missing",
        node.relative_to_store(kept_files[1]): (
            f"size {kept_files[1].stat().st_size}, indexed as {kept_files[1].stat().st_size - 2}"
        ),
    }
    assert sorted(report["unreferenced_images"]) == sorted(
        node.relative_to_store(p) for p in [*late_files, junk]
    )
    assert report["unreferenced_results"] == ["results/999/1.2.3.dcm"]
    assert report["temporaries"] == [node.relative_to_store(partial)]
    text = node.cli("store", "check")
    assert text.returncode == 1 and "NOT consistent" in text.stdout
    assert "images no index row names (--repair indexes them): 5" in text.stdout

    code, repaired = _check(node, "--repair")
    done = repaired["repaired"]
    assert code == 1  # the lost image, the altered one and the junk remain for the operator
    assert done["indexed"] == 4 and done["series"] == [late]
    assert sorted(done["removed"]) == sorted(
        ["results/999/1.2.3.dcm", node.relative_to_store(partial)]
    )
    assert [path for path, _ in done["unreadable"]] == [node.relative_to_store(junk)]
    assert not partial.exists() and not stray_seg.exists() and junk.exists()
    after = repaired["report"]
    assert after["unreferenced_images"] == [node.relative_to_store(junk)]
    assert after["temporaries"] == [] and after["unreferenced_results"] == []

    # The re-indexed series is whole, attributed to its sender, and not segmented again
    # by itself: the scheduler queues the next series' job but none for it.
    shown = node.series_show(late)
    assert shown["series_description"] == "after the backup"
    [version] = shown["versions"]
    assert version["state"] == "complete" and version["instances"] == 4
    assert version["completion_reason"] == "indexed by store check"
    rows = node.instance_rows(late)
    assert len(rows) == 4 and {r["calling_ae_title"] for r in rows} == {"STORESCU"}
    assert {r["size_bytes"] for r in rows} == {p.stat().st_size for p in late_files}
    node.start()
    third = _send(node, tmp_path / "c", 2, "third")
    wait_until(
        lambda: [j for j in node.cli_json("jobs", "list") if j["series_instance_uid"] == third],
        timeout_s=30,
        what="the third series' job queued",
    )
    assert [j for j in node.cli_json("jobs", "list") if j["series_instance_uid"] == late] == []
    assert node.stop() == 0

    # The operator accepts the loss of the missing image; the altered one is theirs to mend.
    junk.unlink()
    code, forgot = _check(node, "--forget-missing")
    assert code == 1 and forgot["repaired"]["forgotten"] == 1
    assert [m["path"] for m in forgot["report"]["missing"]] == [
        node.relative_to_store(kept_files[1])
    ]
    assert node.series_show(kept)["versions"][0]["instances"] == 2
    with kept_files[1].open("r+b") as altered:
        altered.truncate(kept_files[1].stat().st_size - 2)
    code, final = _check(node)
    assert code == 0 and final["consistent"] is True
    assert node.cli("store", "check").stdout.strip().endswith("consistent")


@pytest.mark.peers
def test_a_lost_index_is_rebuilt_from_the_store(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(overrides={"completion": {"quiet_period_s": 1}})
    first = _send(node, tmp_path / "a", 3, "first")
    second = _send(node, tmp_path / "b", 5, "second")
    wait_series_complete(node, first, count=3)
    wait_series_complete(node, second, count=5)
    before = {r["sop_instance_uid"]: dict(r) for r in node.instance_rows()}
    assert node.stop() == 0
    for index_file in node.data_dir.glob("index.sqlite*"):
        index_file.unlink()

    code, rebuilt = _check(node, "--repair", "--grace-s", "0")
    assert code == 0, rebuilt
    assert rebuilt["repaired"]["indexed"] == 8
    assert sorted(rebuilt["repaired"]["series"]) == sorted([first, second])
    listed = {s["series_instance_uid"]: s for s in node.series_json()}
    assert {uid: s["instances"] for uid, s in listed.items()} == {first: 3, second: 5}
    after = {r["sop_instance_uid"]: dict(r) for r in node.instance_rows()}
    assert after.keys() == before.keys()
    for sop, row in after.items():
        for column in (
            "path",
            "size_bytes",
            "sop_class_uid",
            "transfer_syntax_uid",
            "instance_number",
            "image_position",
            "image_orientation",
            "frame_of_reference_uid",
            "rows",
            "columns",
            "calling_ae_title",
            "series_description",
            "modality",
        ):
            assert row[column] == before[sop][column], (sop, column)
    assert node.start().cli("status").returncode == 0


def test_repair_and_forget_on_sqlite(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    check_repair_and_forget(index, FileStore(tmp_path / "store", 0, fsync=False), tmp_path)


def check_repair_and_forget(index: Index, store: FileStore, tmp_path: Path) -> None:
    """Index files no row names, settle their version, forget a lost one; also run on
    PostgreSQL (test_postgres)."""
    generated = make_mr_series(tmp_path / "generated", 450)  # more than one batch
    for source, sop in zip(generated.paths, generated.sop_instance_uids, strict=True):
        relative = store.relative_path(
            generated.study_instance_uid, generated.series_instance_uid, sop
        )
        store.write_atomic(relative, source.read_bytes())
    report = check_store(index, store, grace_s=0)
    assert len(report.unreferenced_images) == 450 and not report.consistent

    repaired = repair_store(index, store, report)
    assert repaired.indexed == 450 and repaired.series == [generated.series_instance_uid]
    with index.session() as session:
        [version] = session.scalars(select(SeriesVersion)).all()
    # One version for the whole folder, settled: complete and routed (not segmented again).
    assert version.version == 1 and version.instance_count == 450
    assert version.state == "complete" and version.routed_at is not None
    assert version.completion_reason == "indexed by store check"
    assert check_store(index, store, grace_s=0).consistent

    lost = store.relative_path(
        generated.study_instance_uid, generated.series_instance_uid, generated.sop_instance_uids[7]
    )
    store.absolute(lost).unlink()
    report = check_store(index, store, grace_s=0)
    assert [(m.kind, m.path, m.problem) for m in report.missing] == [("instance", lost, "missing")]
    assert repair_store(index, store, report, forget=True).forgotten == 1
    assert check_store(index, store, grace_s=0).consistent
    with index.session() as session:
        assert session.scalars(select(SeriesVersion.instance_count)).all() == [449]


def test_only_a_succeeded_jobs_seg_must_exist(tmp_path: Path) -> None:
    """A job queued again keeps its last run's seg_path while its worker removes that file:
    `store check` (run from cron) reported it missing for the whole re-run, and for good if
    the re-run failed."""
    from storage.instances import InstanceRecord, complete_due_series, record_instance
    from storage.queue import JobSpec, claim_job, create_job, fail_job, finish_job, retry_job

    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    store = FileStore(tmp_path / "store", 0, fsync=False)
    image = store.relative_path("1.2", "1.2.3", "1.2.3.1")
    store.write_atomic(image, b"DICM" * 10)
    record_instance(index, InstanceRecord(
        sop_instance_uid="1.2.3.1", series_instance_uid="1.2.3", study_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=image, size_bytes=40,
    ))  # fmt: skip
    (version,) = complete_due_series(index, 0, on_release=False)
    job_id = create_job(index, version.series_version_pk, JobSpec("r", "demo", {}, []))
    assert job_id is not None and claim_job(index, "host:1", 60) is not None
    seg = store.result_path(job_id, "2.25.9.dcm")
    store.write_atomic(seg, b"SEG")
    assert finish_job(index, job_id, seg_path=seg, seg_sop_instance_uid="2.25.9", timings={})
    store.absolute(seg).unlink()  # a succeeded job's SEG gone: reported
    missing = check_store(index, store, grace_s=0).missing
    assert [(m.kind, m.path) for m in missing] == [("seg", seg)]

    assert retry_job(index, job_id) and claim_job(index, "host:1", 60) is not None
    assert check_store(index, store, grace_s=0).consistent  # re-running, no SEG yet
    fail_job(index, job_id, "model crashed", retry_in_s=None, max_attempts=1)
    assert check_store(index, store, grace_s=0).consistent  # failed: it has no SEG


def test_a_link_that_loops_in_the_store_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`store check` ended in an OSError traceback (too many levels of symbolic links)."""
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    store = FileStore(tmp_path / "store")
    folder = store.root / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    (folder / "loop.dcm").symlink_to("loop.dcm")
    (folder / "stray.dcm").write_bytes(b"DICM")
    report = check_store(index, store, grace_s=0)
    assert report.unreferenced_images == ["1.2/1.2.3/stray.dcm"]
    assert "store check: left out 1.2/1.2.3/loop.dcm: Too many levels of symbolic links" in (
        caplog.text
    )


def test_a_whole_copy_of_an_image_in_place_of_its_file_is_indexed_by_repair(
    tmp_path: Path,
) -> None:
    """A re-send of an image with other bytes replaces its file; if its row update then
    fails (index outage: the sender gets 0xA700), the row describes the earlier copy.
    `store check` called that file altered, and `--repair` left it for ever. Damage (cut
    short, bytes added, another image's file) is still only reported."""
    from pydicom import dcmread
    from test_cli import _dicom_node

    from dicom_node.store_check import COMPLETE_COPY, complete_copies
    from storage.models import Instance

    data = tmp_path / "data"  # the layout of storage.data_dir, for the CLI
    index = Index(f"sqlite:///{data / 'index.sqlite'}")
    store = FileStore(data / "store", 0, fsync=False)
    generated = make_mr_series(tmp_path / "generated", 5)
    paths = []
    for source, sop in zip(generated.paths, generated.sop_instance_uids, strict=True):
        relative = store.relative_path(
            generated.study_instance_uid, generated.series_instance_uid, sop
        )
        store.write_atomic(relative, source.read_bytes())
        paths.append(relative)
    assert repair_store(index, store, check_store(index, store, grace_s=0)).indexed == 5

    resent, cut, padded, other = (store.absolute(p) for p in paths[:4])
    ds = dcmread(resent)
    ds.ImageComments = "sent again with a corrected header"
    ds.save_as(resent, enforce_file_format=True)
    with cut.open("r+b") as f:
        f.truncate(cut.stat().st_size - 100)
    with padded.open("ab") as f:
        f.write(b"\0" * 16)
    shutil.copyfile(store.absolute(paths[4]), other)

    report = check_store(index, store, grace_s=0)
    assert sorted(m.path for m in report.missing) == sorted(paths[:3])  # other: same size
    assert list(complete_copies(store, report.missing)) == [paths[0]]
    listed = _dicom_node(data, "store", "check", "--grace-s", "0")
    assert listed.returncode == 1, listed.stderr
    lines = {line.strip().split(":")[0]: line for line in listed.stdout.splitlines()}
    assert lines[paths[0]].endswith(COMPLETE_COPY)
    assert not lines[paths[1]].endswith(COMPLETE_COPY)
    assert not lines[paths[2]].endswith(COMPLETE_COPY)

    repaired = repair_store(index, store, report)
    assert repaired.refreshed == [paths[0]]
    with index.session() as session:
        size = session.scalar(select(Instance.size_bytes).where(Instance.path == paths[0]))
    assert size == resent.stat().st_size
    after = check_store(index, store, grace_s=0)
    assert sorted(m.path for m in after.missing) == sorted(paths[1:3])
    assert complete_copies(store, after.missing) == {}
