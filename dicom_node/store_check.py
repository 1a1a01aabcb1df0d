"""``dicom-node store check --repair``: bring the index back in step with the file store.

Received images are the one thing that cannot be made again, so repair never deletes
them. Files no row names (an index restored from an older backup, or lost altogether; a
crash between a file's rename and its row's COMMIT) are read and indexed as received.
Their series versions are marked complete and routed, because what the node knew of them
is gone: they are not segmented and sent again by themselves (``series process`` does
that for one). Partial files and SEGs of jobs no row names are removed. Rows whose file
is gone are only reported unless the operator forgets them explicitly. A file of another
size than its row's is re-indexed only when it is a whole copy of the row's image: a
re-send that replaced the file and whose own row update then failed (its sender was
refused, so the row still describes the earlier copy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from dicom_node.header_values import text
from dicom_node.instance_attributes import REQUIRED_UIDS, TAG, check_complete, instance_record
from dicom_node.value_warnings import quiet_value_warnings
from storage.consistency import (
    MissingFile,
    StoreReport,
    forget_missing,
    remove_files,
    settle_versions,
)
from storage.database import Index
from storage.filestore import FileStore
from storage.instances import InstanceRecord, InstanceWriter, refresh_instance_rows
from storage.models import Instance
from storage.retention import finish_removals

logger = logging.getLogger(__name__)

COMPLETION_REASON = "indexed by store check"
COMPLETE_COPY = (
    "the file is a whole copy of this image, as a re-send whose index update failed leaves "
    "it: --repair indexes it"
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DELIMITER = 8  # the item that ends an undefined-length value
_BATCH = 200  # rows per transaction: short write locks while a node receives


@dataclass
class Repair:
    indexed: int = 0
    series: list[str] = field(default_factory=list)  # series that got re-indexed images
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why): left alone
    removed: list[str] = field(default_factory=list)  # partial files, SEGs of no job
    forgotten: int = 0  # rows of missing files removed (--forget-missing)
    finished_removals: int = 0  # prunes or deletes a crash interrupted, finished
    refreshed: list[str] = field(default_factory=list)  # rows re-read from a whole copy


def repair_store(
    index: Index,
    store: FileStore,
    report: StoreReport,
    *,
    forget: bool = False,
) -> Repair:
    """Act on ``report`` (from ``check_store``); run ``check_store`` again to see the result."""
    result = Repair()
    # First: their files are not lost images (the report left them out) and go.
    result.finished_removals = finish_removals(index, store)
    copies = complete_copies(store, report.missing)
    if copies:
        refresh_instance_rows(index, list(copies.values()))
        result.refreshed = sorted(copies)
        for path in result.refreshed:
            logger.info("store check: re-indexed %s from the whole copy it holds", path)
    leftovers = report.temporaries + report.unreferenced_results
    remove_files(store, leftovers)
    result.removed = leftovers
    writer = InstanceWriter(index)
    # A series' files share a folder. Its versions are settled after the whole folder:
    # settled earlier, the folder's next batch would open yet another version.
    for _folder, paths in groupby(report.unreferenced_images, key=lambda p: p.rsplit("/", 1)[0]):
        records = list(_readable(store, paths, result))
        began: set[int] = set()
        for batch in _batches(records, _BATCH):
            batch = _not_indexed(index, batch, result)
            if not batch:
                continue
            recorded = writer.record(batch)
            began.update(r.version_pk for r in recorded if r.version_is_new)
            result.indexed += len(batch)
            for uid in dict.fromkeys(r.series_instance_uid for r in batch):
                if uid not in result.series:
                    result.series.append(uid)
                    logger.info("store check: indexed images of series %s", uid)
        settle_versions(index, sorted(began), COMPLETION_REASON)
    if forget:
        # Only files that are gone: an altered file is still there to restore or inspect.
        missing = [
            m.path for m in report.missing if m.kind == "instance" and m.problem == "missing"
        ]
        result.forgotten = forget_missing(index, missing)
    return result


def complete_copies(store: FileStore, missing: list[MissingFile]) -> dict[str, InstanceRecord]:
    """Of the images whose file has another size than their row says, those whose file is
    a whole, readable copy of the same image (path -> its record, read from the file).
    Damage (cut short, bytes added, another image) is not."""
    copies: dict[str, InstanceRecord] = {}
    for m in missing:
        if m.kind != "instance" or not m.problem.startswith("size "):
            continue
        try:
            rec = _read_record(store, m.path, to_its_end=True)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, InvalidDicomError):
            continue
        if rec.sop_instance_uid == m.sop_instance_uid:
            copies[m.path] = rec
    return copies


def _ends_with_its_last_element(ds: Dataset, size: int) -> bool:
    """Does the file end where its last element does? Read as written, with nothing after it."""
    tags = list(ds.keys())
    if not tags:
        return False
    last = ds.get_item(max(tags))
    if not isinstance(last, RawDataElement) or last.value is None:
        return False
    if last.length == _UNDEFINED_LENGTH:
        end = last.value_tell + len(last.value) + _DELIMITER
    else:
        end = last.value_tell + last.length
    return end == size


def _readable(store: FileStore, paths: Iterable[str], result: Repair) -> Iterator[InstanceRecord]:
    for path in paths:
        try:
            yield _read_record(store, path)
        except InvalidDicomError:
            # The receiver writes every image as a Part 10 file (pydicom's "use force=True"
            # is no advice for an administrator).
            why = "not a DICOM file (no Part 10 header): the node did not write it"
            result.unreadable.append((path, why))
            logger.error("store check: %s cannot be indexed, left in place: %s", path, why)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            result.unreadable.append((path, str(exc) or type(exc).__name__))
            logger.error("store check: %s cannot be indexed, left in place: %s", path, exc)


def _read_record(store: FileStore, relative: str, *, to_its_end: bool = False) -> InstanceRecord:
    path = store.absolute(relative)
    # pydicom complains of a misspelled or unknown Specific Character Set on each read: a
    # line per image of such a device, as the receiver logs none (the file keeps it).
    with quiet_value_warnings() as complaints:
        ds = dcmread(path)  # Part 10 as stored: the receiver wrote the file meta
        if to_its_end and not _ends_with_its_last_element(ds, path.stat().st_size):
            raise ValueError("bytes after its last element")
        check_complete(ds)
        uids = {name: text(ds, tag) for name, tag in REQUIRED_UIDS}
    if complaints:
        logger.debug("store check: %s: %s", relative, "; ".join(dict.fromkeys(complaints)))
    absent = [name for name, value in uids.items() if not value]
    if absent:
        raise ValueError(f"{', '.join(absent)} missing or empty")
    meta = ds.file_meta
    sop_class_uid = text(ds, TAG["SOPClassUID"]) or str(meta.get("MediaStorageSOPClassUID", ""))
    return instance_record(
        ds,
        uids,
        sop_class_uid,
        str(meta.get("TransferSyntaxUID", "")),
        relative,
        path.stat().st_size,
        # Who sent it survives in the file meta the receiver wrote; the address does not.
        calling_ae_title=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
        peer_address="",
        association_id="store-check",
    )


def _not_indexed(
    index: Index, records: list[InstanceRecord], result: Repair
) -> list[InstanceRecord]:
    """Leave out images whose SOP Instance UID the index has under another file."""
    with index.session() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.path).where(
                Instance.sop_instance_uid.in_([r.sop_instance_uid for r in records])
            )
        ).all()
    known = {sop: path for sop, path in rows}
    fresh: list[InstanceRecord] = []
    for rec in records:
        other = known.get(rec.sop_instance_uid)
        if other is not None:
            why = f"SOP Instance UID {rec.sop_instance_uid} is indexed as {other}"
            result.unreadable.append((rec.path, why))
            logger.warning("store check: %s not indexed, left in place: %s", rec.path, why)
            continue
        known[rec.sop_instance_uid] = rec.path
        fresh.append(rec)
    return fresh


def _batches(records: list[InstanceRecord], size: int) -> Iterator[list[InstanceRecord]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]
