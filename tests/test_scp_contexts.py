"""The SCP's supported presentation contexts, as each association sees them."""

from __future__ import annotations

import copy

import pytest
from inprocess import MR_IMAGE_STORAGE, InProcessNode
from peers import wait_until
from pydicom import uid as pydicom_uid
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from dicom_node.scp import TRANSFER_SYNTAXES


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
