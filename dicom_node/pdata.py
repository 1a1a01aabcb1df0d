"""P-DATA-TF bytes without pynetdicom's PDU objects: PDV items, C-STORE command sets.

Used by ``dicom_node.reactor`` to take C-STORE requests straight off the socket. Nothing
here guesses: a command set that is not a plain, well-formed C-STORE-RQ is left to
pynetdicom (``parse_store_request`` returns ``None``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

P_DATA_TF = 0x04
PDV_COMMAND = 0x01  # message control header bit 0: command (else data set)
PDV_LAST = 0x02  # bit 1: last fragment of the command or data set

_PDV_HEAD = struct.Struct(">IBB")  # item length, presentation context ID, control header
PDU_HEADER = struct.Struct(">BBI")  # PDU type, reserved, PDU length
_ELEMENT = struct.Struct("<HHI")  # command sets are Implicit VR Little Endian (PS3.7 6.3.1)
_US = struct.Struct("<H")

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101

# Command elements (group 0000) a C-STORE-RQ may carry (PS3.7 9.3.1.1).
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_MESSAGE_ID_RESPONDED_TO = 0x0120
_STATUS = 0x0900
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031
_STORE_ELEMENTS = frozenset(
    {
        _GROUP_LENGTH,
        _AFFECTED_SOP_CLASS,
        _COMMAND_FIELD,
        _MESSAGE_ID,
        _PRIORITY,
        _DATA_SET_TYPE,
        _AFFECTED_SOP_INSTANCE,
        _MOVE_ORIGINATOR_AE,
        _MOVE_ORIGINATOR_ID,
    }
)


class MalformedPDU(ValueError):
    """The P-DATA-TF's items do not add up to its length."""


@dataclass(frozen=True, slots=True)
class PDV:
    context_id: int
    control: int
    data: memoryview
    raw: memoryview  # the whole item, header included: re-sent to pynetdicom as is

    @property
    def is_command(self) -> bool:
        return bool(self.control & PDV_COMMAND)

    @property
    def is_last(self) -> bool:
        return bool(self.control & PDV_LAST)


def split_pdvs(body: memoryview) -> list[PDV]:
    """The presentation data value items of a P-DATA-TF body (after its 6-byte header)."""
    items: list[PDV] = []
    offset, end = 0, len(body)
    while offset < end:
        if offset + _PDV_HEAD.size > end:
            raise MalformedPDU(f"PDV item header cut at byte {offset} of {end}")
        length, context_id, control = _PDV_HEAD.unpack_from(body, offset)
        item_end = offset + 4 + length
        if length < 2 or item_end > end:
            raise MalformedPDU(f"PDV item length {length} at byte {offset} overruns the PDU")
        items.append(
            PDV(
                context_id,
                control,
                body[offset + _PDV_HEAD.size : item_end],
                body[offset:item_end],
            )
        )
        offset = item_end
    return items


def pdv_pdu(item: memoryview) -> bytearray:
    """A P-DATA-TF PDU holding this raw PDV item (a bytearray, as pynetdicom decodes)."""
    return bytearray().join((PDU_HEADER.pack(P_DATA_TF, 0, len(item)), item))


def command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying a whole command set in one PDV."""
    item = _PDV_HEAD.pack(len(command) + 2, context_id, PDV_COMMAND | PDV_LAST) + command
    return PDU_HEADER.pack(P_DATA_TF, 0, len(item)) + item


@dataclass(frozen=True, slots=True)
class StoreRequest:
    message_id: int
    priority: int
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_ae: str | None = None
    move_originator_id: int | None = None


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii").strip()


def parse_store_request(command: bytes) -> StoreRequest | None:
    """The C-STORE-RQ in a command set, or ``None`` when it is anything else.

    ``None`` also for a request without a data set, with elements a C-STORE-RQ does
    not have, or with a value of the wrong size: pynetdicom then answers it its way.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if offset + _ELEMENT.size > end:
            return None
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += _ELEMENT.size
        if group != 0x0000 or element not in _STORE_ELEMENTS or offset + length > end:
            return None
        values[element] = command[offset : offset + length]
        offset += length
    try:
        (field,) = _US.unpack(values[_COMMAND_FIELD])
        (message_id,) = _US.unpack(values[_MESSAGE_ID])
        (priority,) = _US.unpack(values[_PRIORITY])
        (data_set_type,) = _US.unpack(values[_DATA_SET_TYPE])
        sop_class_uid = _text(values[_AFFECTED_SOP_CLASS])
        sop_instance_uid = _text(values[_AFFECTED_SOP_INSTANCE])
        move_ae = values.get(_MOVE_ORIGINATOR_AE)
        move_id = values.get(_MOVE_ORIGINATOR_ID)
        move_originator_id = _US.unpack(move_id)[0] if move_id is not None else None
        move_originator_ae = _text(move_ae) if move_ae is not None else None
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != C_STORE_RQ or data_set_type == NO_DATA_SET:
        return None
    if not sop_class_uid or not sop_instance_uid or priority not in (0, 1, 2):
        return None
    return StoreRequest(
        message_id,
        priority,
        sop_class_uid,
        sop_instance_uid,
        move_originator_ae or None,
        move_originator_id,
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid_value(uid: object) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def encode_store_success(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a successful C-STORE-RSP, as pynetdicom encodes it (tested)."""
    body = b"".join(
        (
            _element(_AFFECTED_SOP_CLASS, _uid_value(sop_class_uid)),
            _element(_COMMAND_FIELD, _US.pack(C_STORE_RSP)),
            _element(_MESSAGE_ID_RESPONDED_TO, _US.pack(message_id)),
            _element(_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
            _element(_STATUS, _US.pack(0x0000)),
            _element(_AFFECTED_SOP_INSTANCE, _uid_value(sop_instance_uid)),
        )
    )
    return _element(_GROUP_LENGTH, struct.pack("<I", len(body))) + body
