"""The file store: atomic writes (the whole file under its final name, or nothing), safe names."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dicom_node.errors import StorageError
from storage.filestore import (
    _HOST,
    STALE_TMP_S,
    TMP_PREFIX,
    FileStore,
    sanitise_uid,
    temporary_name,
)


def _temporaries(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


def test_parts_are_written_in_turn_under_the_final_name(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    final, folders = store.write_file(relative, b"header", memoryview(b"-data"))
    # A new study and series folder: all three entries must be synced for the rename.
    assert folders == (final.parent, final.parent.parent, store.root)
    assert final.read_bytes() == b"header-data" and _temporaries(store.root) == []
    assert store.write_atomic(relative, b"again") == final  # replaced whole
    assert final.read_bytes() == b"again" and _temporaries(store.root) == []


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    store.absolute(relative).mkdir(parents=True)  # a folder in the way: the rename fails
    with pytest.raises(StorageError, match="cannot write"):
        store.write_atomic(relative, b"x")
    assert _temporaries(store.root) == []


def test_uids_become_distinct_safe_names() -> None:
    valid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
    assert sanitise_uid(valid) == valid  # the layout of valid UIDs is the UIDs themselves
    assert sanitise_uid(valid + "\x00") == valid
    odd = [
        "1.2.3/7", "1.2.3_7", "1.2.3 7", "../../etc/passwd", ".1.2.", "1.2", "1" * 65, "1" * 66,
        "1" * 64 + "2", "1.2.3_7_" + "0" * 16,
    ]  # fmt: skip
    names = [sanitise_uid(uid) for uid in odd]
    assert len(set(names)) == len(odd), names
    for name in names:
        assert len(name) <= 64 and "/" not in name and not name.startswith(".")
    with pytest.raises(ValueError):
        sanitise_uid(" \x00")


def test_a_sweep_takes_only_temporaries_no_running_writer_will_rename(tmp_path: Path) -> None:
    """At start the node removes partial files of crashed writers, but not those of a worker
    still running on this machine or of another machine sharing the store."""
    store = FileStore(tmp_path / "store")
    folder = store.root / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that ran and is gone
    live = subprocess.Popen(["sleep", "30"])
    try:
        gone = {
            "crashed writer": temporary_name(dead.pid),
            "this process (before it writes)": temporary_name(),
            "older version (no owner)": f"{TMP_PREFIX}{'a' * 32}",
            "other machine, stale": temporary_name(7, "other-machine"),
            # Named before the PID namespace was part of a temporary's name.
            "crashed writer, older name": f"{TMP_PREFIX}{_HOST}~{dead.pid}~{'b' * 32}",
        }
        kept = {
            "running worker": temporary_name(live.pid),
            "other machine, young": temporary_name(7, "other-machine"),
            # Containers of one hostname (docker --network host) each count pids from 1:
            # another's writer with this process's pid, or a pid not running here, may run.
            "another PID namespace, this pid": temporary_name(namespace="0123456789ab"),
            "another PID namespace, a pid gone here": temporary_name(
                dead.pid, namespace="0123456789ab"
            ),
            "another PID namespace, the worker's pid": temporary_name(
                live.pid, namespace="0123456789ab"
            ),
        }
        for name in [*gone.values(), *kept.values()]:
            (folder / name).write_bytes(b"partial")
        stale = time.time() - STALE_TMP_S - 60
        os.utime(folder / gone["other machine, stale"], (stale, stale))
        assert store.sweep_temporaries() == len(gone)
        assert sorted(p.name for p in _temporaries(store.root)) == sorted(kept.values())
        # A replaced receiver process: only its own.
        assert store.sweep_temporaries(live.pid) == 1
        del kept["running worker"]
        assert sorted(p.name for p in _temporaries(store.root)) == sorted(kept.values())
    finally:
        live.kill()
        live.wait()


def test_only_removals_whose_owner_is_gone_are_for_others_to_finish(tmp_path: Path) -> None:
    """A prune or `series delete` records the files it removes in .removing/. Another node
    starting on the shared store (or a `store check --repair`) finished every record, also
    one whose removal was still under way in a running process or on another machine."""
    store = FileStore(tmp_path / "store")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])

    def record(what: str, stale: bool = False, **owner: object) -> str:
        name = store.begin_removal([(f"1.2/1.2.3/{what}.dcm", 1)], [])
        path = store.absolute(name)
        content = json.loads(path.read_text())
        content["owner"].update(owner)
        if owner.get("host") == "none":
            del content["owner"]
        path.write_text(json.dumps(content))
        if stale:
            old = time.time() - STALE_TMP_S - 60
            os.utime(path, (old, old))
        return name

    try:
        gone = {
            record("this process (before it removes anything)"),
            record("crashed process of this machine", pid=dead.pid),
            record("older version (no owner)", host="none"),
            record("other machine, stale", stale=True, host="other-machine"),
        }
        kept = {
            record("running process of this machine", pid=live.pid),
            record("other machine, young", host="other-machine"),
            # A container of the same hostname: its pid means nothing here.
            record("another PID namespace", pid=dead.pid, namespace="0123456789ab"),
        }
        assert set(store.pending_removals()) == gone | kept  # store check lists them all
        assert set(store.pending_removals(abandoned_only=True)) == gone
    finally:
        live.kill()
        live.wait()


def test_a_written_file_leaves_no_temporary_and_names_its_writer(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    name = temporary_name()
    assert name.startswith(TMP_PREFIX) and f"~{os.getpid()}~" in name
    store.write_atomic(store.relative_path("1.2", "1.2.3", "1.2.3.4"), b"x")
    assert store.sweep_temporaries() == 0
