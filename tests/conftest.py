"""Fixtures that start real peers (the node, Orthanc) on free ports and stop them by PID."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessNode, inprocess_node, logging_kept
from peers import SHARED_DATA, NodeProcess, Orthanc, PeerUnavailable
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association

from dicom_node.scu_responses import keep_responses_for_sender

NodeFactory = Callable[..., NodeProcess]
OrthancFactory = Callable[..., Orthanc]


@pytest.fixture(autouse=True, scope="session")
def scu_responses_kept() -> Iterator[None]:
    """The tests' own pynetdicom SCUs, which stand in for scanners, guarded against
    pynetdicom's response race as the node's are (``dicom_node.scu_responses``): on a
    loaded machine a test's C-STORE otherwise now and then gets no status. pynetdicom's
    own ``associate`` stays reachable as ``AE.associate.__wrapped__``."""
    unguarded = AE.associate

    @functools.wraps(unguarded)
    def associate(self: AE, *args: Any, **kwargs: Any) -> Association:
        return keep_responses_for_sender(unguarded(self, *args, **kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AE, "associate", associate)
        yield


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """A CLI command run in this process (typer's ``CliRunner``, in test_models and
    test_model_install_fixes) configures logging as the node does: the root logger's handlers
    replaced by one on the runner's stderr, which the runner closes when the command ends,
    and the root at INFO. Left so for the rest of the run, every later record reaching the
    root (an association thread's end, between two tests) was a "--- Logging error ---"
    (ValueError: I/O operation on closed file) in the suite's output."""
    with logging_kept(capture_handlers=False):
        yield


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """``make(name="node", start=True, **NodeProcess kwargs)``: a node in ``tmp_path/name``;
    every node made is stopped (SIGTERM, then SIGKILL) at teardown."""
    made: list[NodeProcess] = []

    def make(name: str = "node", *, start: bool = True, **kwargs: Any) -> NodeProcess:
        node = NodeProcess(tmp_path / name, **kwargs)
        made.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in reversed(made):
        node.stop()


@pytest.fixture
def node(node_factory: NodeFactory) -> NodeProcess:
    """A started node with the default test config (calling AE STORESCU allowed)."""
    return node_factory()


@pytest.fixture
def scp_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessNode]:
    """The node's Storage SCP in this process (see ``inprocess``), stopped at teardown."""
    # As the node runs at its INFO log level: pynetdicom's per-message log handlers unbound.
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    with inprocess_node(tmp_path / "data") as node:
        yield node


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """``make(name="orthanc", **Orthanc kwargs)``: a started Orthanc; skipped if not installed."""
    made: list[Orthanc] = []

    def make(name: str = "orthanc", **kwargs: Any) -> Orthanc:
        orthanc = Orthanc(tmp_path / name, **kwargs)
        made.append(orthanc)
        try:
            return orthanc.start()
        except PeerUnavailable as exc:
            pytest.skip(str(exc))

    yield make
    for orthanc in reversed(made):
        orthanc.stop()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The machine is shared: torch on one thread, as a worker's cpu_threads would set it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real DICOM series); skipped in a checkout without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (shared test data is not part of the project)")
    return SHARED_DATA


def _skip_missing_peer() -> Iterator[None]:
    try:
        yield
    except PeerUnavailable as exc:  # only where DCMTK/Orthanc/openssl are not installed
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A missing peer binary (``PeerUnavailable``) skips the test, with its reason."""
    _ = item
    with contextlib.contextmanager(_skip_missing_peer)():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _ = item
    with contextlib.contextmanager(_skip_missing_peer)():
        return (yield)


@pytest.fixture
def pacs_and_node(
    node_factory: NodeFactory, orthanc_factory: OrthancFactory
) -> tuple[Orthanc, NodeProcess]:
    """Orthanc (AET ORTHANC) knows the node as modality NODE; the node knows Orthanc as peer
    `pacs` and segments every MR series with the demo model, returning it to its origin."""
    from e2e import make_pacs_and_node

    return make_pacs_and_node(node_factory, orthanc_factory)
