"""README "Recovering from faults", followed as an administrator would: the fault made on a
node's data folder, then the README's commands run as it gives them, through the CLI.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import test_cli
from peers import make_mr_series

from storage.database import Index
from storage.filestore import FileStore

REBUILD = "dicom-node store check --repair --grace-s 0"


def _dicom_node(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return test_cli._dicom_node(data_dir, *args, storage="  min_free_disk_mb: 0\n")


def _old(path: Path) -> None:
    """Older than store check's grace period: not a file a running node is writing."""
    then = time.time() - 3600
    os.utime(path, (then, then))


def _image_in_store(data_dir: Path, tmp_path: Path) -> str:
    """One generated MR image written where the receiver would have put it."""
    series = make_mr_series(tmp_path / "generated", 1)
    store = FileStore(data_dir / "store", 0, fsync=False)
    relative = store.relative_path(
        series.study_instance_uid, series.series_instance_uid, series.sop_instance_uids[0]
    )
    store.write_atomic(relative, series.paths[0].read_bytes())
    _old(store.absolute(relative))
    return relative


def test_files_repair_cannot_index_are_not_sent_back_to_repair(tmp_path: Path) -> None:
    """A file in the store that is not DICOM, and a second copy of an indexed image: repair
    leaves both in place. The check after it still listed them under "--repair indexes
    them", so `store check --repair` (and its exit 1) went round for good."""
    data = tmp_path / "data"
    indexed = _image_in_store(data, tmp_path)
    assert _dicom_node(data, "store", "check", "--repair").returncode == 0
    junk = data / "store" / "notes.dcm"
    junk.write_text("not an image")
    copy = data / "store" / "copy.dcm"
    copy.write_bytes((data / "store" / indexed).read_bytes())
    _old(junk)
    _old(copy)

    repaired = _dicom_node(data, "store", "check", "--repair")
    assert repaired.returncode == 1, repaired.stdout  # still there: not consistent
    out = repaired.stdout
    assert "--repair indexes them" not in out, out
    assert "files --repair cannot index, left in place:" in out, out
    assert "move each out of the store: 2" in out, out
    assert "notes.dcm: not a DICOM file" in out, out
    assert "force=True" not in out  # pydicom's advice, not the administrator's
    assert "copy.dcm: SOP Instance UID" in out and f"is indexed as {indexed}" in out, out

    # Moved out, as the check says: consistent.
    junk.rename(tmp_path / junk.name)
    copy.rename(tmp_path / copy.name)
    assert _dicom_node(data, "store", "check").returncode == 0


def _damage(index: Path, table: str | None = None) -> None:
    """Overwrite one table's root page (or the whole file) as a failing disk would."""
    if table is None:
        index.write_bytes(b"\xab" * index.stat().st_size)
        return
    with sqlite3.connect(index) as conn:
        page = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(index, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\xab" * page_size)


def test_a_damaged_index_says_how_to_rebuild_it_and_the_rebuild_works(tmp_path: Path) -> None:
    """A SQLite index damaged on disk: `store check` (the README's check after any fault)
    ended in a traceback; every other command said `cannot migrate the index`, nothing of
    what to do. Both now name the damage and the README's rebuild, which then works."""
    data = tmp_path / "data"
    _image_in_store(data, tmp_path)  # received; the rebuild indexes it again
    index = data / "index.sqlite"
    Index(f"sqlite:///{index}").dispose()  # made as a node's start makes it
    told = (
        f"is damaged ({{}}): stop the node, move {index}* aside and rebuild the index from "
        f"the store with `{REBUILD}`"
    )

    _damage(index, "instances")  # the schema still readable: the check's query fails
    checked = _dicom_node(data, "store", "check")
    assert checked.returncode == 2, (checked.stdout, checked.stderr)
    assert "Traceback" not in checked.stderr, checked.stderr
    assert told.format("database disk image is malformed") in checked.stderr, checked.stderr

    _damage(index)  # not even its schema readable: fails as the index is opened
    status = _dicom_node(data, "status")
    assert status.returncode == 2, (status.stdout, status.stderr)
    assert "Traceback" not in status.stderr, status.stderr
    assert told.format("file is not a database") in status.stderr, status.stderr

    # The README's rebuild, as it gives it.
    aside = tmp_path / "aside"
    aside.mkdir()
    for damaged in data.glob("index.sqlite*"):
        damaged.rename(aside / damaged.name)
    rebuilt = _dicom_node(data, "store", "check", "--repair", "--grace-s", "0")
    assert rebuilt.returncode == 0, rebuilt.stdout
    assert "indexed 1 images of 1 series" in rebuilt.stdout, rebuilt.stdout


def test_an_index_of_a_newer_release_says_what_to_do(tmp_path: Path) -> None:
    """Back on an older release after an upgrade: Alembic's "Can't locate revision" alone."""
    data = tmp_path / "data"
    data.mkdir()
    Index(f"sqlite:///{data / 'index.sqlite'}").dispose()
    with sqlite3.connect(data / "index.sqlite") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    run = _dicom_node(data, "status")
    assert run.returncode == 2, run.stderr
    assert "Can't locate revision identified by '9999'" in run.stderr
    assert "migrated by a newer release of dicom-node" in run.stderr, run.stderr
    assert "restore the index backed up before the upgrade" in run.stderr, run.stderr
