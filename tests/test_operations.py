"""What an administrator meets starting and running the node: ``scripts/run-node.sh``, the
first log lines, start-up checks, and the systemd unit ``scripts/dicom-node.service``."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import NodeFactory
from peers import DICOM_NODE, REPO_ROOT, free_port

from dicom_node import __version__
from dicom_node.service import STORE_DRAIN_TIMEOUT_S
from dicom_node.worker import WorkerPool

UNIT = REPO_ROOT / "scripts" / "dicom-node.service"
# Outbox.stop waits this long for a send under way (outbox.py), after the workers.
OUTBOX_STOP_S = 30.0


# -- scripts/run-node.sh ---------------------------------------------------------------------


def _checkout_with_venv(tmp_path: Path) -> Path:
    """scripts/run-node.sh in a copy of the project, its install a no-op, its .venv this one;
    the copy's config.yaml has a key only it has, so the error names the file used."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "run-node.sh", root / "scripts" / "run-node.sh")
    install = root / "scripts" / "install.sh"
    install.write_text("#!/bin/sh\nexit 0\n")
    install.chmod(0o755)
    (root / ".venv").symlink_to(REPO_ROOT / ".venv")
    (root / "config.yaml").write_text("from_the_checkout: 1\n")
    return root


@pytest.mark.parametrize(
    ("args", "env", "used"),
    [
        (["--config", "given.yaml"], {}, "from_the_caller"),
        (["--config=given.yaml"], {}, "from_the_caller"),
        ([], {"DICOM_NODE_CONFIG": "given.yaml"}, "from_the_caller"),
        ([], {}, "from_the_checkout"),
    ],
)
def test_run_node_serves_the_configuration_it_is_given(
    tmp_path: Path, args: list[str], env: dict[str, str], used: str
) -> None:
    """`scripts/run-node.sh --config /etc/dicom-node/config.yaml` ignored its arguments and
    served the checkout's config.yaml (its port, its ./var); a relative DICOM_NODE_CONFIG was
    taken from the checkout, not from where the administrator ran it. Without either, the
    checkout's config.yaml, as the README says."""
    root = _checkout_with_venv(tmp_path)
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / "given.yaml").write_text("from_the_caller: 1\n")
    run = subprocess.run(
        ["bash", str(root / "scripts" / "run-node.sh"), *args],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": os.environ["PATH"], **env},
    )
    assert run.returncode == 2, run.stderr
    assert f"{used}: unknown key" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


# -- start-up ----------------------------------------------------------------------------------


def test_the_first_log_lines_say_what_the_node_runs_with(node_factory: NodeFactory) -> None:
    """At start the log said only `listening as AE ... on ...`: not which release, which
    configuration file, where the data and the index are, which models it has, how many
    workers on which device: what an administrator checks first."""
    node = node_factory(overrides={"workers": {"processes": 0}})
    log = node.log_text()
    first = node.wait_for_log("starting")
    assert f"dicom-node {__version__} starting" in first
    assert str(node.config_path) in first
    assert f"AE {node.ae_title} on 127.0.0.1:{node.port}" in first
    storage = node.wait_for_log("storage: ")
    assert f"files in {node.store_dir}" in storage and "MB free" in storage
    assert f"index sqlite:///{node.index_path}" in storage
    inference = node.wait_for_log("inference: ")
    assert "no inference workers (workers.processes 0)" in inference
    assert f"models in {node.data_dir / 'models'}" in inference
    assert "demo (built-in)" in inference
    assert log.index("starting") < log.index("listening as AE")


def test_a_password_in_the_index_url_is_not_logged() -> None:
    from dicom_node.service import shown_url

    shown = shown_url("postgresql+psycopg://node:s3cret@db.example.org/dicom")
    assert "s3cret" not in shown and "db.example.org/dicom" in shown


def test_a_configured_models_dir_that_is_not_there_is_warned_of(
    node_factory: NodeFactory,
) -> None:
    """inference.models_dir set to a folder that is not there (a typo, a volume not mounted):
    the node started without a word, and only the demo model was there to run."""
    node = node_factory(overrides={"inference": {"models_dir": "no-such-models"}})
    line = node.wait_for_log("inference.models_dir")
    assert "WARNING" in line
    assert f"{node.workdir / 'no-such-models'} is not a folder" in line


def _unwritable_for_the_node(folder: Path) -> list[str]:
    """Make ``folder`` one the node cannot write in; returns the command prefix that runs
    the node so (as root: without the capabilities that override file permissions)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot run the node without root's rights")
    os.chown(folder, 65534, 65534)  # nobody's; mode 755: root without DAC override is "other"
    folder.chmod(0o755)
    caps = "-dac_override,-dac_read_search,-fowner"
    return [setpriv, f"--bounding-set={caps}", "--inh-caps=-all", "--"]


def test_a_store_the_node_cannot_write_in_stops_the_start(tmp_path: Path) -> None:
    """A store folder the node's user cannot write (made by root with scripts/run-node.sh,
    then run as a service user): the node started, answered C-ECHO and the health check, and
    refused every image with 0xA700 (`cannot write ...: Permission denied`)."""
    store = tmp_path / "data" / "store"
    store.mkdir(parents=True)
    prefix = _unwritable_for_the_node(store)
    config = tmp_path / "config.yaml"
    port = free_port()
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"port": port, "bind_address": "127.0.0.1"},
                "storage": {"data_dir": "data", "min_free_disk_mb": 0},
                "workers": {"processes": 0},
            }
        )
    )
    proc = subprocess.Popen(
        [*prefix, str(DICOM_NODE), "-c", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _out, err = proc.communicate()
        pytest.fail(f"the node started on a store it cannot write in:\n{err}")
    assert proc.returncode == 2, err
    assert f"cannot write in {store}" in err, err
    assert "Traceback" not in err, err
    assert "listening as AE" not in err, err


def _serve_exits(command: list[str], config: Path) -> str:
    """Run `serve` with ``config``, expecting it to refuse to start; its stderr."""
    proc = subprocess.run(
        [*command, str(DICOM_NODE), "-c", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("case", ["port below 1024", "address not of this machine"])
def test_a_port_the_node_cannot_listen_on_is_named_with_its_fix(tmp_path: Path, case: str) -> None:
    """Both were told "is another node or PACS using the port?": wrong for port 104 without
    root's rights (the fix is a capability) and for a bind_address of another machine."""
    prefix: list[str] = []
    node: dict[str, object] = {"port": free_port(), "bind_address": "127.0.0.1"}
    if case == "port below 1024":
        node["port"] = 104
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: port 104 cannot be refused")
            prefix = [setpriv, "--bounding-set=-net_bind_service", "--inh-caps=-all", "--"]
    else:
        node["bind_address"] = "192.0.2.1"  # TEST-NET-1: never an address of this machine
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": node,
                "storage": {"data_dir": "data"},
                "workers": {"processes": 0},
                "logging": {"file": "data/node.log"},
            }
        )
    )
    err = _serve_exits(prefix, config)
    assert "another node or PACS" not in err, err
    # The reason is in the log file too, not only on stderr.
    logged = (tmp_path / "data" / "node.log").read_text()
    assert "ERROR" in logged and "serve failed: cannot listen on" in logged, logged
    if case == "port below 1024":
        assert "cannot listen on 127.0.0.1:104: Permission denied" in err, err
        assert "CAP_NET_BIND_SERVICE" in err, err
    else:
        assert "cannot listen on 192.0.2.1:" in err, err
        assert "node.bind_address is not an address of this machine" in err, err


# -- the systemd unit --------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value.strip())
    assert match, f"TimeoutStopSec={value}: give seconds or minutes"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_the_systemd_unit_runs_the_console_script_serve() -> None:
    service = _unit()["Service"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "dicom-node" in scripts
    command = service["ExecStart"].split()
    assert Path(command[0]).name == "dicom-node" and Path(command[0]).parent.name == "bin"
    assert Path(command[0]).parent.parent.name == ".venv"  # the checkout's, where run-node.sh
    assert Path(command[0]).parent.parent.parent == Path(service["WorkingDirectory"])
    assert command[-1] == "serve"
    assert "--config" in command
    assert service["Type"] == "simple"  # the node does not send sd_notify's READY=1
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root")


def test_the_systemd_unit_stops_the_node_as_the_node_stops_itself() -> None:
    """SIGTERM to the main process only, which stops its receivers and workers itself (the
    default, control-group, would signal them all at once); SIGKILL only after every stage of
    the node's own stop has had its time: in-flight stores, running jobs, a send under way."""
    service = _unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    stages = STORE_DRAIN_TIMEOUT_S + WorkerPool.STOP_GRACE_S + OUTBOX_STOP_S
    assert _seconds(service["TimeoutStopSec"]) >= stages + 10


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # Its paths made this checkout's, which exist here.
    text = UNIT.read_text()
    working = _unit()["Service"]["WorkingDirectory"]
    unit = tmp_path / "dicom-node.service"
    unit.write_text(text.replace(working, str(REPO_ROOT)))
    run = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "dicom-node.service" not in run.stdout + run.stderr, run.stdout + run.stderr
