"""Limits from config: concurrent associations and the maximum PDU we advertise."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from peers import SCU_AET, NodeProcess, echoscu, wait_until
from pynetdicom import AE

pytestmark = pytest.mark.peers

VERIFICATION = "1.2.840.10008.1.1"


def _associate(node: NodeProcess, max_pdu: int = 16384) -> AE:
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(VERIFICATION)
    ae.maximum_pdu_size = max_pdu
    return ae


def test_associations_beyond_the_limit_are_rejected(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(overrides={"node": {"max_associations": 1}})
    ae = _associate(node)
    held = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert held.is_established
    try:
        second = echoscu(node.port)
        assert second.returncode != 0
        assert "Local Limit Exceeded" in second.stdout + second.stderr
        assert "association limit reached" in node.wait_for_log("association rejected")
    finally:
        held.release()
    assert echoscu(node.port).returncode == 0  # the slot is free again


def test_the_health_check_passes_on_a_node_at_its_association_limit(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """A busy node is alive: a refused check must not have Docker restart it mid-series,
    nor log a warning once a minute."""
    node = node_factory(overrides={"node": {"max_associations": 1}})
    held = _associate(node).associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert held.is_established
    logged = len(node.log_text())
    try:
        checked = node.cli("status", "--check", "--json")
        assert checked.returncode == 0, checked.stderr
        answer = node.cli_json("status", "--check")["answers"][f"127.0.0.1:{node.port}"]
        assert answer == "answers, association rejected: Local limit exceeded", answer
    finally:
        held.release()
    assert "association rejected" not in node.log_text()[logged:]


def test_a_port_probe_does_not_hold_an_association_slot(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """A bare TCP connect (health check, port scan) must not refuse the next real sender."""
    import socket

    node = node_factory(overrides={"node": {"max_associations": 1}})
    for _ in range(3):
        socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
    # A held slot stays held for the whole 30 s ACSE timeout; allow the probes' connection
    # threads a moment to see the close, far less than that.
    wait_until(lambda: echoscu(node.port).returncode == 0, timeout_s=5, what="an echo")


def test_maximum_pdu_is_the_configured_one(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(overrides={"node": {"max_pdu_bytes": 32768}})
    assoc = _associate(node).associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 32768
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
