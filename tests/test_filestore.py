"""The file store's staged writes: nothing visible under the final name until placed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import StorageError
from storage.filestore import TMP_PREFIX, FileStore


def _temporaries(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


def test_staged_file_appears_only_when_placed(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    staged = store.stage(relative, b"header", memoryview(b"-data"))
    final = store.absolute(relative)
    assert not final.exists() and len(_temporaries(store.root)) == 1
    # A new study and series folder: all three entries must be synced for the rename.
    assert staged.folders == (final.parent, final.parent.parent, store.root)
    assert staged.place_durably() == final
    assert final.read_bytes() == b"header-data" and _temporaries(store.root) == []


def test_discarded_and_failed_files_leave_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    store.stage(relative, b"x").discard()
    assert _temporaries(store.root) == [] and not store.absolute(relative).exists()

    staged = store.stage(relative, b"x")
    store.absolute(relative).mkdir()  # a folder in the way: the rename fails
    with pytest.raises(StorageError, match="cannot write"):
        staged.place()
    assert _temporaries(store.root) == []
