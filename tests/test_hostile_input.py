"""Hostile or broken input at the node's network entry, and who may read what it writes.

A node on a hospital network is reached by port scanners, misconfigured devices and the
occasional attacker. Each test sends the node in this process what such a peer sends: a
UID made for the file path, a PDU or element announcing 4 GiB, sequences nested 10,000 deep,
a peer that sends a byte now and then (slowloris). Found by a helper's audit: a study UID
naming the store's results folder, a trickling peer holding its association slot for ever,
and images and SEGs readable by every local user.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
import test_upper_layer
from inprocess import (
    InProcessNode,
    association_request,
    inprocess_node,
    minimal_mr_dataset,
    mr_image,
    mr_store_association,
    store_command_set,
)
from peers import wait_until
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import encode
from pynetdicom.presentation import build_context

from storage.filestore import RESULTS_DIR, FileStore

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
A_ASSOCIATE_AC, P_DATA_TF, A_ABORT = 0x02, 0x04, 0x07


# test_upper_layer's: pynetdicom's log handlers unbound, as at INFO; a node of 16 KiB PDUs.
quiet_pynetdicom = test_upper_layer.quiet_pynetdicom
node = test_upper_layer.node


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The default umask of most distributions (and of systemd services and Docker)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _request() -> bytes:
    context = build_context(MR, [EXPLICIT])
    context.context_id = 1
    return association_request([context])


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body; type 0 when the connection closed."""
    try:
        return test_upper_layer._read_pdu(sock)
    except EOFError:
        return 0, b""


def _answer(sock: socket.socket) -> int:
    try:
        return _read_pdu(sock)[0]
    except ConnectionResetError:
        return 0


@contextmanager
def _associate(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_request())
        assert _read_pdu(sock)[0] == A_ASSOCIATE_AC
        yield sock


def _p_data(control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, 1, control) + data
    return struct.pack(">BBI", P_DATA_TF, 0, len(pdv)) + pdv


def _explicit(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _store_status(port: int, ds: Dataset, data: bytes) -> int:
    """The status the node answers a C-STORE of ``ds`` whose data set is ``data``, sent in
    PDUs of the node's maximum."""
    with _associate(port) as sock:
        command = encode(store_command_set(ds), True, True)
        assert command is not None
        sock.sendall(_p_data(0x03, command))
        step = 16000
        for start in range(0, len(data), step):
            last = 0x02 if start + step >= len(data) else 0x00
            sock.sendall(_p_data(last, data[start : start + step]))
        pdu_type, body = _read_pdu(sock)
        assert pdu_type == P_DATA_TF, pdu_type
        status = read_dataset(BytesIO(body[6:]), True, True).Status
        return int(status)


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def _max_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


# -- UIDs made for the file path -------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    [
        ".",
        "..",
        "....",
        "../../../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        "..\x00",
        "1.2\x003",
        "1" * 300,
        "." * 64,
        ".removing",
        RESULTS_DIR,
        " ",
        "-",
    ],
)
def test_a_uid_made_for_the_path_names_one_folder_inside_the_store(
    tmp_path: Path, uid: str
) -> None:
    store = FileStore(tmp_path / "store")
    try:
        relative = store.relative_path(uid, uid, uid)
    except ValueError:
        assert not uid.strip()  # only a blank UID has no name: its store is refused
        return
    parts = relative.split("/")
    assert len(parts) == 3 and all(0 < len(part) <= 68 for part in parts), relative
    assert not any(part.startswith(".") or "\x00" in part for part in parts), relative
    assert parts[0] != RESULTS_DIR
    written = store.write_atomic(relative, b"DICM")
    assert written.resolve().is_relative_to(store.root.resolve())


def test_a_study_uid_naming_the_results_folder_is_kept_apart_from_the_jobs_results(
    tmp_path: Path,
) -> None:
    """Study "results", Series "7": the image was stored in job 7's results folder, and job 7
    removed it as an earlier result when it ran (an acknowledged image lost, its row left
    naming a missing file); a prune of job 7 took it too."""
    store = FileStore(tmp_path / "store")
    image = store.relative_path(RESULTS_DIR, "7", "1.2.3")
    store.write_atomic(image, b"DICM")
    assert store.job_results(7) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_an_image_stored_under_hostile_uids_stays_in_the_store(node: InProcessNode) -> None:
    for uid in ("..", "../../x", RESULTS_DIR):
        ds = minimal_mr_dataset()
        ds.StudyInstanceUID = uid
        assert _store_status(node.port, ds, _explicit(ds)) == 0x0000
    stored = [p for p in node.store.root.rglob("*.dcm")]
    assert len(stored) == 3
    assert not (node.store.root / RESULTS_DIR).exists()
    assert all(p.resolve().is_relative_to(node.store.root.resolve()) for p in stored)


# -- lengths that announce more than comes -----------------------------------------------------


def test_pdus_announcing_4_gib_are_aborted_unread(
    node: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    before = _max_rss_mb()
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF) + b"\0" * 100)
        assert _answer(sock) == A_ABORT
    with _associate(node.port) as sock:
        sock.sendall(struct.pack(">BBI", P_DATA_TF, 0, 0xFFFFFFF0) + b"\0" * 100)
        assert _answer(sock) == A_ABORT
    assert "PDU of type 0x01 announces 4294967295 bytes" in _messages(caplog)
    assert "P-DATA-TF of 4294967280 bytes, more than the 16384" in _messages(caplog)
    assert _max_rss_mb() - before < 200


def _nested_sequences(depth: int) -> bytes:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    sequence = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + item
    ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return sequence * depth + ends * depth


def test_hostile_data_sets_are_refused_and_the_node_serves_on(
    node: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    """An element announcing 0xFFFFFFF0 bytes, sequences nested 10,000 deep: 0xC210 with a
    line, nothing stored, memory not grown by what was announced; the next image is stored.
    200,000 tiny elements are a valid data set: stored."""
    ds = minimal_mr_dataset()
    huge = struct.pack("<HH2sHI", 0x0011, 0x1010, b"OB", 0, 0xFFFFFFF0) + b"\0" * 64
    before = _max_rss_mb()
    assert _store_status(node.port, ds, _explicit(ds) + huge) == 0xC210
    assert _max_rss_mb() - before < 200
    assert _store_status(node.port, ds, _explicit(ds) + _nested_sequences(10_000)) == 0xC210
    said = _messages(caplog)
    assert "element (0011,1010) is truncated" in said
    assert "maximum recursion depth exceeded" in said
    assert not list(node.store.root.rglob("*.dcm"))
    tiny = b"".join(
        struct.pack("<HH2sHI", 0x0011 + 2 * (n // 60_000), 0x1000 + n % 60_000, b"UN", 0, 0)
        for n in range(200_000)
    )
    assert _store_status(node.port, ds, _explicit(ds) + tiny) == 0x0000
    with mr_store_association(node.port) as assoc:
        assert assoc.send_c_store(minimal_mr_dataset()).Status == 0x0000


# -- peers that hold a slot ------------------------------------------------------------------


@contextmanager
def _trickling(port: int, data: bytes, *, associate: bool) -> Iterator[threading.Event]:
    """A peer sending ``data`` a byte every 0.2 s (after an accepted association where
    ``associate``); the event is set once the node has cut it off."""
    cut = threading.Event()
    stop = threading.Event()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            if associate:
                sock.sendall(_request())
                assert _read_pdu(sock)[0] == A_ASSOCIATE_AC
            for byte in data:
                if stop.wait(0.2):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    cut.set()
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield cut
    finally:
        stop.set()
        thread.join(timeout=10)


def test_peers_sending_a_byte_now_and_then_give_their_slots_back(
    tmp_path: Path, quiet_pynetdicom: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Slowloris: pynetdicom checks its ARTIM and network timers only between PDUs, and a read
    waits node.network_timeout_s for each byte. A peer trickling its association request (no
    AE title checked yet) or a PDU held its slot for as long as it went on: max_associations
    of them shut every sender out for ever. Now a request must be whole within
    min(30 s, network_timeout_s) of connecting, another PDU within network_timeout_s."""
    settings = {"network_timeout_s": 1.0, "max_associations": 2}
    with (
        inprocess_node(tmp_path / "data", node=settings) as node,
        _trickling(node.port, _request(), associate=False) as requesting,
        _trickling(node.port, _p_data(0x03, b"\0" * 200), associate=True) as sending,
    ):
        wait_until(requesting.is_set, timeout_s=15, what="the trickled request cut off")
        wait_until(sending.is_set, timeout_s=15, what="the trickled PDU cut off")
        wait_until(
            lambda: not node.running.ae.active_associations, timeout_s=10, what="slots freed"
        )
        with mr_store_association(node.port) as assoc:  # a sender gets in
            assert assoc.send_c_store(minimal_mr_dataset()).Status == 0x0000
    said = _messages(caplog)
    assert "did not send a whole association request within 1 s of connecting" in said
    assert "did not send a whole PDU within 1 s of its first byte" in said


def test_an_image_after_a_quiet_spell_gets_the_whole_timeout_to_arrive(
    tmp_path: Path, quiet_pynetdicom: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A scanner keeps its association open and sends each image as it is reconstructed:
    the PDU after a quiet spell of most of node.network_timeout_s must not be cut for
    arriving over the little that is left of it (the deadline counts from its first byte)."""
    with inprocess_node(tmp_path / "data", node={"network_timeout_s": 2.0}) as node:
        ds = minimal_mr_dataset()
        command = encode(store_command_set(ds), True, True)
        assert command is not None
        first = _p_data(0x03, command)
        with _associate(node.port) as sock:
            time.sleep(1.4)  # quiet, within the network timeout
            for start in range(0, len(first), len(first) // 4 + 1):
                sock.sendall(first[start : start + len(first) // 4 + 1])
                time.sleep(0.25)  # the command PDU takes ~1 s: past 2 s since the last PDU
            sock.sendall(_p_data(0x02, _explicit(ds)))
            pdu_type, body = _read_pdu(sock)
            assert pdu_type == P_DATA_TF, (pdu_type, _messages(caplog))
            assert read_dataset(BytesIO(body[6:]), True, True).Status == 0x0000
            quiet_from = time.monotonic()
            assert _read_pdu(sock)[0] == A_ABORT  # quiet for good: an idle association ends
            assert 1.5 < time.monotonic() - quiet_from < 10
    assert "did not send a whole PDU" not in _messages(caplog)


def test_a_whole_image_in_one_pdu_arriving_steadily_over_a_slow_link_is_stored(
    tmp_path: Path, quiet_pynetdicom: None, caplog: pytest.LogCaptureFixture
) -> None:
    """node.max_pdu_bytes 0 (unlimited): senders put a whole image in one PDU. One arriving
    steadily but taking longer than node.network_timeout_s (a 1 GB tomosynthesis image over
    100 Mbit/s: 80 s) was cut off as a trickling peer, and sent again for ever. A PDU's
    deadline moves on a second for each 16 KiB that comes."""
    node_settings = {"network_timeout_s": 1.0, "max_pdu_bytes": 0}
    with inprocess_node(tmp_path / "data", node=node_settings) as node:
        ds = mr_image(512, seed=3)  # 512 KiB of pixels
        command = encode(store_command_set(ds), True, True)
        assert command is not None
        whole = _p_data(0x02, _explicit(ds))
        with _associate(node.port) as sock:
            sock.sendall(_p_data(0x03, command))
            step = len(whole) // 20 + 1
            for start in range(0, len(whole), step):  # ~350 KiB/s: 1.5 s in all
                sock.sendall(whole[start : start + step])
                time.sleep(0.075)
            pdu_type, body = _read_pdu(sock)
            assert pdu_type == P_DATA_TF, (pdu_type, _messages(caplog))
            assert read_dataset(BytesIO(body[6:]), True, True).Status == 0x0000
    assert "did not send a whole PDU" not in _messages(caplog)


# -- who may read what the node writes --------------------------------------------------------


def test_images_segs_and_their_folders_are_not_readable_by_every_user(
    tmp_path: Path, quiet_pynetdicom: None, umask_022: None
) -> None:
    """Written 0644 in folders 0755 under the usual umask 022: every local user could read
    every patient's images and SEGs. The service's user and group only (0640, 0750)."""
    with inprocess_node(tmp_path / "data") as node:
        with mr_store_association(node.port) as assoc:
            assert assoc.send_c_store(minimal_mr_dataset()).Status == 0x0000
        node.store.write_atomic(node.store.result_path(1, "1.2.3.dcm"), b"DICM")
        root = node.store.root
        written = [root, *root.rglob("*")]
    files = [p for p in written if p.is_file()]
    folders = [p for p in written if p.is_dir()]
    assert len(files) == 2 and len(folders) == 5, written
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert {oct(modes[p.relative_to(root).as_posix()]) for p in files} == {"0o640"}, modes
    assert {oct(modes[p.relative_to(root).as_posix()]) for p in folders} == {"0o750"}, modes


def test_the_index_log_and_data_folder_are_not_readable_by_every_user(tmp_path: Path) -> None:
    """The index (patient names and IDs), the log (UIDs, AE titles, some header values) and
    the data folder were made 0644/0755 under the usual umask 022. Commands now run with
    umask 027 at least, and the umask the shell had is kept where it is stricter."""
    data = tmp_path / "data"
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{data_dir: {data}}}\nlogging: {{file: {tmp_path / 'n.log'}}}\n")
    command = [str(Path(sys.executable).with_name("dicom-node")), "-c", str(config)]
    for umask, index_mode, folder_mode in ((0o022, 0o640, 0o750), (0o077, 0o600, 0o700)):
        shutil.rmtree(data, ignore_errors=True)
        (tmp_path / "n.log").unlink(missing_ok=True)
        run = subprocess.run(
            ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *command, "store", "check"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        modes = {
            name: stat.S_IMODE(path.stat().st_mode)
            for name, path in (
                ("index", data / "index.sqlite"),
                ("log", tmp_path / "n.log"),
                ("data", data),
                ("store", data / "store"),
            )
        }
        assert modes == {
            "index": index_mode,
            "log": index_mode,
            "data": folder_mode,
            "store": folder_mode,
        }, (oct(umask), {k: oct(v) for k, v in modes.items()})
