"""Random streams of P-DATA-TF PDUs against the node's receive path: what must always hold.

Each scenario is a few C-STOREs and C-ECHOs, split into PDVs and PDUs at random places,
some of them damaged: a command element changed, a PDV on another presentation context,
a data set cut short or with bytes changed, a stray PDV, a PDV length off by one, an
A-RELEASE-RQ, A-ABORT, second A-ASSOCIATE-RQ or unknown PDU in the middle, the connection
cut inside a PDU. Whatever the node answers, these hold after every scenario:

- no thread of the node ends with an exception;
- every C-STORE answered with Success is stored and indexed, its file ending with the
  data set as sent (the data set named by the request: the node refuses another);
- the association's threads end once the peer has gone;
- the node answers the next association.

The seeds are fixed, so a failure names a scenario that can be replayed. Runs of this
generator with thousands of seeds found the defects these tests now guard (see
test_store_fast_path and test_reactor).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO

import pytest
from inprocess import (
    MR_IMAGE_STORAGE,
    InProcessNode,
    association_request,
    associations_ended,
    echo_command_set,
    mr_image,
    store_command_set,
)
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context
from sqlalchemy import select

from storage.models import Instance

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
# Proposed as contexts 1, 3, 5, 7: MR explicit, MR implicit, Verification, CT explicit.
CONTEXTS = [
    (MR_IMAGE_STORAGE, EXPLICIT),
    (MR_IMAGE_STORAGE, IMPLICIT),
    (VERIFICATION, IMPLICIT),
    ("1.2.840.10008.5.1.4.1.1.2", EXPLICIT),
]
MR_EXPLICIT, MR_IMPLICIT, ECHO = 1, 3, 5
SEEDS = range(40)
CUT = b""  # marks "close the connection here" in a scenario's PDU list


def _association_request() -> bytes:
    contexts = []
    for number, (abstract, transfer) in enumerate(CONTEXTS):
        context = build_context(abstract, [transfer])
        context.context_id = 2 * number + 1
        contexts.append(context)
    return association_request(contexts)


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _pdu(body: bytes, pdu_type: int = 0x04) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _image(rng: random.Random) -> Dataset:
    return mr_image(rng.choice([4, 16, 40]), seed=rng.randrange(1 << 30))


def _store_command(message_id: int, ds: Dataset, rng: random.Random) -> tuple[bytes, bool]:
    """The C-STORE-RQ command set, and whether an element of it was changed."""
    command = store_command_set(ds, message_id)
    changed = rng.random() < 0.25
    if changed:  # one element changed: pynetdicom's answer or an abort
        change = rng.randrange(6)
        if change == 0:
            command.Priority = 3
        elif change == 1:
            del command.AffectedSOPInstanceUID
        elif change == 2:
            command.CommandDataSetType = 0x0101  # "no data set", and one follows
        elif change == 3:
            command.CommandField = rng.choice([0x0020, 0x0FFF, 0xD601])
        elif change == 4:
            command.AffectedSOPInstanceUID = "1.2." + "9" * 70
        else:
            del command.CommandField
    encoded = encode(command, True, True)
    assert encoded is not None
    return encoded, changed


def _pieces(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted({rng.randrange(1, len(data)) for _ in range(rng.randrange(3))})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@dataclass
class Scenario:
    pdus: list[bytes] = field(default_factory=list)
    data_sets: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # by message ID
    messages: list[int] = field(default_factory=list)  # every message ID sent
    # Nothing damaged: every message must be answered with Success (a node refusing or
    # dropping every store would otherwise pass, as nothing is stored that it answered).
    undamaged: bool = True


def _scenario(seed: int) -> Scenario:
    rng = random.Random(seed)
    scenario = Scenario()
    pdvs: list[bytes | None] = []  # None: end the PDU here
    for message_id in range(1, rng.randrange(2, 5)):
        scenario.messages.append(message_id)
        context = MR_EXPLICIT if rng.random() < 0.85 else rng.choice([MR_IMPLICIT, ECHO, 7, 2])
        if rng.random() < 0.15:
            pdvs.append(_pdv(ECHO, 0x03, echo_command_set(message_id)))
            continue
        # An MR image on the Verification, the CT or an unproposed context is damage.
        scenario.undamaged &= context in (MR_EXPLICIT, MR_IMPLICIT)
        ds = _image(rng)
        data = encode(ds, context == MR_IMPLICIT, True)
        assert data is not None
        if rng.random() < 0.1:
            changed = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                changed[rng.randrange(len(changed))] = rng.randrange(256)
            data = bytes(changed)
            scenario.undamaged = False
        if rng.random() < 0.05:
            data = data[: rng.randrange(1, len(data))]
            scenario.undamaged = False
        scenario.data_sets[message_id] = (ds.SOPInstanceUID, data)
        command_set, changed_command = _store_command(message_id, ds, rng)
        scenario.undamaged &= not changed_command
        command = _pieces(command_set, rng)
        for number, piece in enumerate(command):
            pdvs.append(_pdv(context, 0x03 if number == len(command) - 1 else 0x01, piece))
        fragments = _pieces(data, rng)
        for number, piece in enumerate(fragments):
            on = context if rng.random() > 0.03 else rng.choice([MR_EXPLICIT, MR_IMPLICIT, ECHO])
            scenario.undamaged &= on == context
            pdvs.append(_pdv(on, 0x02 if number == len(fragments) - 1 else 0x00, piece))
            if rng.random() < 0.4:
                pdvs.append(None)
        if rng.random() < 0.04:
            pdvs.append(_pdv(context, 0x02, b""))  # a stray last fragment
            scenario.undamaged = False
    body: list[bytes] = []
    for item in [*pdvs, None]:
        if item is not None:
            body.append(item)
        if body and (item is None or rng.random() < 0.3):
            scenario.pdus.append(_pdu(b"".join(body)))
            body = []
    scenario.undamaged &= not _damage(scenario.pdus, rng)
    return scenario


def _damage(pdus: list[bytes], rng: random.Random) -> bool:
    """Damage the PDU stream in one place, or not (about 3 in 4 times); True if damaged."""
    where = rng.randrange(len(pdus) + 1)
    roll = rng.random()
    if roll < 0.05:
        pdus.insert(where, _pdu(b"\0\0\0\0", 0x05))  # A-RELEASE-RQ
    elif roll < 0.08:
        pdus.insert(where, _pdu(b"\0\0\0\0", 0x07))  # A-ABORT
    elif roll < 0.11:
        pdus.insert(where, _association_request())
    elif roll < 0.14:
        pdus.insert(where, _pdu(bytes(rng.randrange(256) for _ in range(6)), 0x09))
    elif roll < 0.17:
        pdus.insert(where, _pdu(struct.pack(">IBB", 1, 1, 3)))  # PDV shorter than its header
    elif roll < 0.20:
        index = rng.randrange(len(pdus))
        changed = bytearray(pdus[index])
        changed[9] ^= 0x01  # the first PDV's length off by one
        pdus[index] = bytes(changed)
    elif roll < 0.23:
        index = rng.randrange(len(pdus))
        pdus[index] = pdus[index][: rng.randrange(1, len(pdus[index]))]
        pdus[index + 1 :] = [CUT]
    else:
        return False
    return True


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _play(port: int, scenario: Scenario) -> list[tuple[int, int]]:
    """Send the scenario; return (message ID, status) of every C-STORE/C-ECHO answer."""
    answers: list[tuple[int, int]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_association_request())
        head = _read_exactly(sock, 6)
        assert head is not None and head[0] == 0x02, head  # A-ASSOCIATE-AC
        assert _read_exactly(sock, struct.unpack(">I", head[2:])[0]) is not None
        for pdu in scenario.pdus:
            if pdu == CUT:
                return answers
            try:
                sock.sendall(pdu)
            except OSError:
                break
        sock.settimeout(0.5)  # an answer not here by then is not coming: release
        released = False
        while True:
            try:
                head = _read_exactly(sock, 6)
            except TimeoutError:
                if released:
                    break
                released = True
                try:
                    sock.sendall(_pdu(b"\0\0\0\0", 0x05))
                except OSError:
                    break
                sock.settimeout(10)
                continue
            except OSError:
                break
            if head is None:
                break
            body = _read_exactly(sock, struct.unpack(">I", head[2:])[0])
            if body is None or head[0] != 0x04:
                break  # A-RELEASE-RP, A-ABORT: the end
            offset = 0
            while offset < len(body):
                (length,) = struct.unpack_from(">I", body, offset)
                command = decode(BytesIO(body[offset + 6 : offset + 4 + length]), True, True)
                answers.append((int(command.MessageIDBeingRespondedTo), int(command.Status)))
                offset += 4 + length
    return answers


def _stored_as_sent(node: InProcessNode, sop_uid: str, data: bytes) -> bool:
    with node.index.session() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))
    return path is not None and node.store.absolute(path).read_bytes().endswith(data)


@pytest.fixture
def thread_deaths() -> Iterator[list[str]]:
    deaths: list[str] = []
    previous = threading.excepthook

    def record(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        deaths.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = record
    yield deaths
    threading.excepthook = previous


@pytest.mark.parametrize("seed", SEEDS)
def test_random_pdu_streams_lose_nothing_and_end_cleanly(
    scp_in_process: InProcessNode, thread_deaths: list[str], seed: int
) -> None:
    scenario = _scenario(seed)
    answers = _play(scp_in_process.port, scenario)
    if scenario.undamaged:
        # Sorted: the scenario sends every request at once, which a peer without
        # asynchronous operations must not, so a C-ECHO may be answered after a later
        # C-STORE (they are served on different threads).
        assert sorted(answers) == [(message_id, 0x0000) for message_id in scenario.messages], seed
    for message_id, status in answers:
        if status == 0x0000 and message_id in scenario.data_sets:
            sop_uid, data = scenario.data_sets[message_id]
            assert _stored_as_sent(scp_in_process, sop_uid, data), (seed, message_id)
    associations_ended(scp_in_process)
    assert thread_deaths == []
    scu = AE(ae_title="PEER")
    scu.add_requested_context(VERIFICATION)
    again = scu.associate("127.0.0.1", scp_in_process.port, ae_title="DICOMNODE")
    assert again.is_established
    assert again.send_c_echo().Status == 0x0000
    again.release()
    associations_ended(scp_in_process)  # its end is logged inside the test
