"""Images whose indexed header values are random bytes, sent as they are to a node.

Whatever a device writes into the attributes the index keeps (names in odd character
sets, numbers out of range, NULs inside values, overlong text, binary noise), the store
must succeed: the file keeps the bytes, the index what it can hold. Runs of this
generator found stores refused with 0xA700 on every retry, on SQLite (a number beyond
64 bits, a name pydicom's JIS decoder fails on) and on PostgreSQL (NUL in text).
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

from inprocess import MR_IMAGE_STORAGE, InProcessNode, mr_store_association
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import text

from dicom_node.instance_attributes import TAG

_PIECES = [b"1", b"9", b".", b" ", b"\0", b"\\", b"A", b"^", b"=", b"-", b"e", b"\xe9",
           b"\xc3\xa9", b"\x1b$B", b"\xff", b"0", b":", b"/"]  # fmt: skip
_CHARSETS = [None, b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"GB18030", b"ISO_IR 999"]
_LONG_VRS = {"OB", "OW", "SQ", "UT", "UN", "UC", "UR"}


def _value(rng: random.Random, vr: str) -> bytes:
    if vr in ("US", "UL"):
        return struct.pack("<H", rng.randrange(65536))
    roll = rng.random()
    if roll < 0.1:
        return b"9" * rng.randrange(10, 40)  # beyond any integer column
    if roll < 0.2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(30)))
    if roll < 0.25:
        return b"A" * rng.randrange(300, 2000)  # beyond any text column
    return b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(20)))


def _element(tag: int, vr: str, value: bytes) -> bytes:
    value += b" " * (len(value) % 2)
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def random_header_file(folder: Path, seed: int) -> tuple[Path, str]:
    """A Part 10 MR image with random values in a random choice of the indexed attributes;
    returns its path and SOP Instance UID."""
    rng = random.Random(seed)
    root = f"1.2.826.0.1.3680043.8.498.{seed}"
    sop_uid = f"{root}.1"
    elements = {
        0x00080016: ("UI", MR_IMAGE_STORAGE.encode() + b"\0"),
        0x00080018: ("UI", sop_uid.encode()),
        0x0020000D: ("UI", f"{root}.2".encode()),
        0x0020000E: ("UI", f"{root}.3".encode()),
    }
    charset = rng.choice(_CHARSETS)
    if charset is not None:
        elements[0x00080005] = ("CS", charset)
    chosen = rng.sample(sorted(TAG.items()), rng.randrange(1, len(TAG)))
    for keyword, tag in chosen:
        if keyword != "SOPClassUID":
            vr = dictionary_VR(tag)
            elements[tag] = (vr, _value(rng, vr))
    body = b"".join(_element(tag, vr, value) for tag, (vr, value) in sorted(elements.items()))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = f"{root}.9"
    header = io.BytesIO()
    header.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(header, meta, enforce_standard=True)
    path = folder / f"{seed}.dcm"
    path.write_bytes(header.getvalue() + body)
    return path, sop_uid


def check_random_headers_are_stored(node: InProcessNode, folder: Path, seeds: range) -> None:
    """Send each seed's image as its bytes are (``STORE_SEND_CHUNKED_DATASET`` must be
    set): every one is answered Success and indexed."""
    refused: list[str] = []
    sent: list[str] = []
    with mr_store_association(node.port) as assoc:
        for seed in seeds:
            path, sop_uid = random_header_file(folder, seed)
            status = assoc.send_c_store(path)
            if status.Status != 0x0000:
                refused.append(f"seed {seed}: {status.Status:#06x} {status.get('ErrorComment')}")
            sent.append(sop_uid)
    assert refused == []
    with node.index.engine.connect() as conn:
        indexed = conn.execute(text("SELECT sop_instance_uid FROM instances")).scalars().all()
    assert sorted(indexed) == sorted(sent)
