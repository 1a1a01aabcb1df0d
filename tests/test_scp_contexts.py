"""The SCP's supported presentation contexts, as each association sees them, and requests
sent on a context that does not take them."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from io import BytesIO

import pytest
from inprocess import MR_IMAGE_STORAGE, InProcessNode, minimal_mr_dataset
from peers import wait_until
from pydicom import Dataset
from pydicom import uid as pydicom_uid
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_ACTION,
    DimseServiceType,
)
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from sqlalchemy import select

from dicom_node.scp import TRANSFER_SYNTAXES, VERIFICATION
from storage.models import Instance


def _count_uid_validations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every UID pydicom builds with validation from now on."""
    seen: list[str] = []
    validate = pydicom_uid.validate_value

    def counted(vr: str, value: object, mode: int, *args: object) -> object:
        if vr == "UI":
            seen.append(str(value))
        return validate(vr, value, mode, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom_uid, "validate_value", counted)
    return seen


def test_copying_the_servers_contexts_rebuilds_no_uid(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    (server,) = scp_in_process.running.servers
    contexts = server.contexts
    assert len(contexts) > 100  # every storage SOP class
    plain = PresentationContext()
    plain.abstract_syntax = MR_IMAGE_STORAGE
    plain.transfer_syntax = TRANSFER_SYNTAXES

    seen = _count_uid_validations(monkeypatch)
    copy.deepcopy([plain])
    assert len(seen) == 1 + len(TRANSFER_SYNTAXES)  # the generic copy: the check sees it
    seen.clear()
    copies = copy.deepcopy(contexts)  # what pynetdicom does for every association
    assert seen == []

    for original, clone in zip(contexts, copies, strict=True):
        assert clone is not original
        assert clone.transfer_syntax is not original.transfer_syntax
        assert clone.abstract_syntax == original.abstract_syntax
        assert clone.transfer_syntax == original.transfer_syntax
        assert (clone.scu_role, clone.scp_role) == (original.scu_role, original.scp_role)
    copies[1].transfer_syntax.clear()
    assert contexts[1].transfer_syntax  # a copy changed leaves the server's untouched


def test_association_negotiates_from_its_own_copy(scp_in_process: InProcessNode) -> None:
    running, port = scp_in_process.running, scp_in_process.port
    (server,) = running.servers
    scu = AE(ae_title="PEER")
    scu.add_requested_context(MR_IMAGE_STORAGE, ["1.2.840.10008.1.2.4.90"])  # JPEG 2000 only
    assoc = scu.associate("127.0.0.1", port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established
        (accepted,) = assoc.accepted_contexts
        assert (accepted.abstract_syntax, accepted.transfer_syntax[0]) == (
            MR_IMAGE_STORAGE,
            "1.2.840.10008.1.2.4.90",
        )
        (acceptor,) = wait_until(lambda: running.ae.active_associations, timeout_s=5)
        supported = acceptor.acceptor.supported_contexts
        assert {id(cx) for cx in supported}.isdisjoint(id(cx) for cx in server.contexts)
        assert [cx.abstract_syntax for cx in supported] == [
            cx.abstract_syntax for cx in server.contexts
        ]
    finally:
        assoc.release()


# -- requests on a context that does not take them ---------------------------------------

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def _query(kind: type[C_FIND | C_GET | C_MOVE], sop_class: str) -> DimseServiceType:
    request = kind()
    request.AffectedSOPClassUID = sop_class
    request.Priority = 0
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    request.Identifier = BytesIO(encode(identifier, True, True))
    if isinstance(request, C_MOVE):
        request.MoveDestination = "PEER"
    return request


def _action(sop_class: str) -> DimseServiceType:
    request = N_ACTION()
    request.RequestedSOPClassUID = sop_class
    request.RequestedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    request.ActionTypeID = 1
    return request


def _echo() -> DimseServiceType:
    request = C_ECHO()
    request.AffectedSOPClassUID = VERIFICATION
    return request


def _store() -> DimseServiceType:
    ds = minimal_mr_dataset()
    request = C_STORE()
    request.AffectedSOPClassUID = MR_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0
    # The Verification context's transfer syntax.
    request.DataSet = BytesIO(encode(ds, True, True))
    return request


def _indexed(node: InProcessNode, sop_uid: str) -> bool:
    with node.index.session() as session:
        found = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid))
    return found is not None


@pytest.mark.parametrize(
    ("make", "context_class", "status"),
    [
        # pynetdicom answered a C-ECHO-RSP (Success) to these three.
        pytest.param(lambda: _query(C_FIND, VERIFICATION), VERIFICATION, 0x0211, id="c-find"),
        pytest.param(lambda: _query(C_GET, VERIFICATION), VERIFICATION, 0x0211, id="c-get"),
        pytest.param(lambda: _query(C_MOVE, VERIFICATION), VERIFICATION, 0x0211, id="c-move"),
        # It aborted the association (no service class for Study Root on Verification).
        pytest.param(
            lambda: _query(C_FIND, STUDY_ROOT_FIND), VERIFICATION, 0x0122, id="c-find-study"
        ),
        # A C-STORE-RSP 0xA700, "C-STORE failed unexpectedly" logged.
        pytest.param(lambda: _action(MR_IMAGE_STORAGE), MR_IMAGE_STORAGE, 0x0211, id="n-action"),
        # pynetdicom's Storage Commitment SCP, without a handler: 0x0110 (processing failure).
        pytest.param(
            lambda: _action(STORAGE_COMMITMENT), MR_IMAGE_STORAGE, 0x0122, id="n-action-commit"
        ),
        pytest.param(_echo, MR_IMAGE_STORAGE, 0x0211, id="c-echo-on-storage"),
        # Stored, under the Verification context's transfer syntax, by the node's fast path.
        pytest.param(_store, VERIFICATION, 0x0211, id="c-store-on-verification"),
    ],
)
def test_request_the_context_does_not_take_gets_its_own_response_with_a_failure(
    scp_in_process: InProcessNode,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[], DimseServiceType],
    context_class: str,
    status: int,
) -> None:
    """PS3.7 C.5: 0x0211 for an operation not agreed on the context, 0x0122 for a SOP class
    the node does not support; the association goes on."""
    caplog.set_level(logging.WARNING, logger="dicom_node.reactor")
    scu = AE(ae_title="PEER")
    scu.add_requested_context(VERIFICATION)
    scu.add_requested_context(MR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", scp_in_process.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        (context,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == context_class]
        assert context.context_id is not None
        request = make()
        request.MessageID = 42
        # The test reads the response itself: the peer's own reactor must not take it.
        assoc._reactor_checkpoint.clear()
        wait_until(lambda: assoc._is_paused, timeout_s=5, what="the peer's reactor to pause")
        try:
            assoc.dimse.send_msg(request, context.context_id)
            context_id, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()

        assert type(response) is type(request)
        assert context_id == context.context_id
        assert response is not None
        assert response.MessageIDBeingRespondedTo == 42
        assert response.Status == status
        sop_class = getattr(request, "AffectedSOPClassUID", None) or request.RequestedSOPClassUID
        assert response.AffectedSOPClassUID == sop_class
        (line,) = [r for r in caplog.records if r.name == "dicom_node.reactor"]
        assert line.levelno == logging.WARNING
        said = line.getMessage()
        assert "AE 'PEER'" in said
        assert f"{request.msg_type}-RQ" in said
        assert f"presentation context {context.context_id} " in said
        assert f"0x{status:04X}" in said

        if isinstance(request, C_STORE):
            assert not _indexed(scp_in_process, str(request.AffectedSOPInstanceUID))
        assert assoc.is_established
        image = minimal_mr_dataset()
        stored = assoc.send_c_store(image)
        assert stored.Status == 0x0000
        assert _indexed(scp_in_process, image.SOPInstanceUID)
    finally:
        assoc.release()
