"""Soak: resource growth of a long-running ``dicom-node serve`` under churn.

    .venv/bin/python benchmarks/soak.py [--minutes 3] [--receiver-processes 1]
        [--series-per-round 20] [--images-per-series 5] [--settle-s 4] [--keep]

Starts the node as the tests do (``tests/peers.py`` ``NodeProcess``: no rules, no workers,
so no inference runs) and drives it in rounds until ``--minutes`` have passed, ``--parallel``
(3) senders at a time. Each round: one association per image (DCMTK ``storescu``), new
series of small images (``make_mr_series``; half one association per series, half all in
one association), senders killed (SIGKILL) while sending 2 MiB images, every third round
a sender stopped (SIGSTOP) inside a transfer until the node's network timeout aborts it,
callers rejected (unknown calling AE title, wrong called AE title), a C-ECHO storm
(``echoscu``), bare TCP connects (port probes), and ``dicom-node status`` / ``series list``
running meanwhile. After each round the load stops for ``--settle-s`` and the node's processes are
sampled idle: RSS, open file descriptors (``/proc/PID/fd``), of which sockets and SQLite
index files, threads (``/proc/PID/task``); also ``.tmp-*`` files in the store and the
log's WARNING/ERROR lines.

Verdict: a figure grows when each of its idle values in the last quarter of the rounds is
above the highest of the first half (after the first round, which warms pools and caches)
by more than a tolerance (RSS 4 MiB, 3 fds, 2 threads, any temporary file): growth that
does not level off. Also listed: the log's WARNING/ERROR lines grouped by message (numbers
and UIDs blanked), and tracebacks. Exit status 1 when something grows or a traceback is
logged.
Not run by CI; the machine is shared, so run it where the node has a core to itself if
the figures are to be compared.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from peers import (
    ECHOSCU,
    NodeProcess,
    dcmtk_env,
    make_mr_series,
    require_binary,
    storescu_command,
)

MIB = 1024 * 1024
# Idle growth above these, from the first half of the rounds to the end, is a leak.
TOLERANCE = {"rss_mib": 4.0, "fds": 3, "sockets": 2, "index_fds": 2, "threads": 2, "tmp": 0}
NETWORK_TIMEOUT_S = 5  # short, so that stalled senders are aborted within a round


@dataclass
class ProcessSample:
    rss_mib: float
    fds: int
    sockets: int
    index_fds: int
    threads: int


@dataclass
class Sample:
    elapsed_s: float
    round: int
    associations: int
    processes: dict[str, ProcessSample]
    tmp: int
    warnings: int
    errors: int


@dataclass
class Counts:
    """What the driver sent; associations counts every connection it opened."""

    associations: int = 0
    images: int = 0
    series: int = 0
    killed: int = 0
    stalled: int = 0
    rejected: int = 0
    echoes: int = 0
    probes: int = 0
    cli_calls: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def fail(self, what: str) -> None:
        with self.lock:
            if len(self.failures) < 20:
                self.failures.append(what)


def node_processes(node: NodeProcess) -> dict[str, psutil.Process]:
    """The node's main process and its receiver processes (not multiprocessing's tracker),
    named main, receiver-1, ... by start time."""
    main = psutil.Process(node.pid)
    children = []
    for child in main.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not any("resource_tracker" in part for part in child.cmdline()):
                children.append(child)
    children.sort(key=lambda p: p.create_time())
    named = {"main": main}
    named.update({f"receiver-{n}": child for n, child in enumerate(children, start=1)})
    return named


def sample_process(process: psutil.Process, index_path: Path) -> ProcessSample:
    fd_dir = Path(f"/proc/{process.pid}/fd")
    sockets = index_fds = fds = 0
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            fds += 1
            if target.startswith("socket:"):
                sockets += 1
            elif target.startswith(str(index_path)):
                index_fds += 1
    return ProcessSample(
        rss_mib=process.memory_info().rss / MIB,
        fds=fds,
        sockets=sockets,
        index_fds=index_fds,
        threads=len(os.listdir(f"/proc/{process.pid}/task")),
    )


def log_levels(text: str) -> tuple[int, int]:
    return text.count(" WARNING "), text.count(" ERROR ")


def take_sample(node: NodeProcess, started: float, round_number: int, counts: Counts) -> Sample:
    processes: dict[str, ProcessSample] = {}
    for name, process in node_processes(node).items():
        with contextlib.suppress(psutil.Error, OSError):
            processes[name] = sample_process(process, node.index_path)
    warnings, errors = log_levels(node.log_text())
    return Sample(
        elapsed_s=time.monotonic() - started,
        round=round_number,
        associations=counts.associations,
        processes=processes,
        tmp=len(node.temporary_files()),
        warnings=warnings,
        errors=errors,
    )


# -- load ---------------------------------------------------------------------------------


def run_quiet(command: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s, check=False
    )


def send(node: NodeProcess, counts: Counts, paths: list[Path], what: str) -> None:
    """One storescu association sending ``paths`` (files, or folders of files)."""
    result = run_quiet(storescu_command(node.port, paths))
    counts.add(associations=1)
    if result.returncode != 0:
        counts.fail(f"{what}: storescu exited {result.returncode}: {result.stderr[-200:]}")
    else:
        counts.add(images=sum(len(list(p.iterdir())) if p.is_dir() else 1 for p in paths))


def echo(node: NodeProcess, counts: Counts, *, aet: str = "STORESCU", aec: str = "") -> None:
    """One C-ECHO association; with another ``aet`` or ``aec`` it must be rejected."""
    command = [require_binary(ECHOSCU), "-aet", aet, "-aec", aec or node.ae_title]
    result = run_quiet([*command, "-to", "10", "127.0.0.1", str(node.port)])
    counts.add(associations=1)
    answered = result.returncode == 0
    if aet == "STORESCU" and not aec:
        if answered:
            counts.add(echoes=1)
        else:
            counts.fail(f"C-ECHO failed: {result.stderr[-200:]}")
    elif answered:
        counts.fail(f"C-ECHO as {aet} to {aec or node.ae_title} was not rejected")
    else:
        counts.add(rejected=1)


def kill_while_sending(
    node: NodeProcess, counts: Counts, folder: Path, delay_s: float, *, stall: bool = False
) -> None:
    """storescu sending ``folder``, SIGKILLed after ``delay_s`` (``stall``: SIGSTOPped
    then, and killed once the node's network timeout has aborted it)."""
    sender = subprocess.Popen(
        storescu_command(node.port, [folder]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    counts.add(associations=1)
    time.sleep(delay_s)
    if stall:
        sender.send_signal(signal.SIGSTOP)
        time.sleep(NETWORK_TIMEOUT_S + 2)
        counts.add(stalled=1)
    else:
        counts.add(killed=1)
    sender.kill()
    sender.wait(timeout=30)


def probe(node: NodeProcess, counts: Counts) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5):
        pass
    counts.add(associations=1, probes=1)


def cli_meanwhile(node: NodeProcess, counts: Counts, stop: threading.Event) -> None:
    """``status`` and ``series list`` one after the other while the load runs."""
    commands = [["status"], ["series", "list", "--json"]]
    turn = 0
    while not stop.is_set():
        args = commands[turn % len(commands)]
        result = node.cli(*args)
        counts.add(cli_calls=1)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [""])[-1]
            counts.fail(f"dicom-node {' '.join(args)} exited {result.returncode}: {last[:300]}")
        turn += 1
        stop.wait(1.0)


@dataclass(frozen=True)
class Load:
    per_image: int
    series_per_round: int
    images_per_series: int
    echoes: int
    rejected: int
    probes: int
    kills: int


def one_round(
    node: NodeProcess,
    counts: Counts,
    load: Load,
    work: Path,
    big: Path,
    round_number: int,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    rng = random.Random(round_number)
    folder = work / f"round-{round_number}"
    singles = make_mr_series(folder / "singles", load.per_image, size=16, seed=round_number)
    series_folders = []
    for n in range(load.series_per_round):
        made = make_mr_series(
            folder / f"series-{n}", load.images_per_series, size=16, seed=round_number
        )
        series_folders.append(made.folder)
    jobs: list[concurrent.futures.Future[object]] = []

    def submit(call: Callable[..., object], *args: object, **kwargs: object) -> None:
        jobs.append(pool.submit(call, *args, **kwargs))

    for path in singles.paths:
        submit(send, node, counts, [path], "one image per association")
    half = len(series_folders) // 2
    for series_folder in series_folders[:half]:
        submit(send, node, counts, [series_folder], "one series per association")
    submit(send, node, counts, series_folders[half:], "several series in one association")
    counts.add(series=len(series_folders) + 1)  # the singles are a series too
    for _ in range(load.kills):
        submit(kill_while_sending, node, counts, big, rng.uniform(0.05, 0.4))
    if round_number % 3 == 1:
        submit(kill_while_sending, node, counts, big, rng.uniform(0.05, 0.3), stall=True)
    for n in range(load.rejected):
        if n % 2:
            submit(echo, node, counts, aet="NOT-A-PEER")
        else:
            submit(echo, node, counts, aec="NOT-THE-NODE")
    for _ in range(load.echoes):
        submit(echo, node, counts)
    for _ in range(load.probes):
        submit(probe, node, counts)
    for job in jobs:
        try:
            job.result(timeout=300)
        except Exception as exc:  # a driver failure is reported, not fatal
            counts.fail(f"{type(exc).__name__}: {exc}")
    shutil.rmtree(folder, ignore_errors=True)


# -- report -------------------------------------------------------------------------------


def table(samples: list[Sample]) -> str:
    names = sorted({name for s in samples for name in s.processes}, key=lambda n: (n != "main", n))
    head = f"{'round':>5} {'t/s':>6} {'assocs':>7} "
    head += " ".join(f"{name[:10] + ' MiB/fd/sk/db/thr':>32}" for name in names)
    head += f" {'tmp':>4} {'warn':>5} {'err':>5}"
    lines = [head]
    for s in samples:
        line = f"{s.round:>5} {s.elapsed_s:>6.0f} {s.associations:>7} "
        cells = []
        for name in names:
            p = s.processes.get(name)
            cells.append(
                f"{p.rss_mib:>9.1f} {p.fds:>5} {p.sockets:>4} {p.index_fds:>3} {p.threads:>4}"
                if p
                else f"{'-':>32}"
            )
        line += " ".join(f"{cell:>32}" for cell in cells)
        line += f" {s.tmp:>4} {s.warnings:>5} {s.errors:>5}"
        lines.append(line)
    return "\n".join(lines)


def verdict(samples: list[Sample]) -> list[str]:
    """Figures whose idle values at the end (each of the last quarter's) exceed the first
    half's highest (round 1 on): a one-off spike (RSS moves by a few MiB with the
    allocator) is not growth."""
    warm = [s for s in samples if s.round >= 1]
    if len(warm) < 6:
        return ["too few rounds for a verdict (run longer)"]
    first, end = warm[: len(warm) // 2], warm[-max(2, len(warm) // 4) :]
    grown: list[str] = []
    names = sorted({name for s in warm for name in s.processes})
    for name in names:
        for metric, tolerance in TOLERANCE.items():
            if metric == "tmp":
                continue
            before = [
                float(getattr(s.processes[name], metric)) for s in first if name in s.processes
            ]
            after = [float(getattr(s.processes[name], metric)) for s in end if name in s.processes]
            if before and after and min(after) > max(before) + tolerance:
                grown.append(f"{name} {metric}: {max(before):g} -> {min(after):g}")
    if min(s.tmp for s in end) > max(s.tmp for s in first) + TOLERANCE["tmp"]:
        grown.append(f"temporary files in the store: {end[-1].tmp}")
    return grown


_BLANKS = (
    (re.compile(r"\d+(\.\d+)+"), "U"),  # UIDs, addresses, decimals
    (re.compile(r"\b[0-9a-f]{32}\b"), "ID"),
    (re.compile(r"\d+"), "N"),
)


def grouped_log_lines(text: str) -> Counter[str]:
    groups: Counter[str] = Counter()
    for line in text.splitlines():
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            if level in line:
                message = level.strip() + " " + line.split(level, 1)[1]
                for pattern, blank in _BLANKS:
                    message = pattern.sub(blank, message)
                groups[message[:150]] += 1
    return groups


@contextlib.contextmanager
def soak_node(work: Path, receiver_processes: int) -> Iterator[NodeProcess]:
    node = NodeProcess(
        work / "node",
        overrides={
            "node": {
                "receiver_processes": receiver_processes,
                "network_timeout_s": NETWORK_TIMEOUT_S,
            },
            "completion": {"quiet_period_s": 2.0},
            "workers": {"processes": 0},
            "rules": [],
        },
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to drive the node")
    parser.add_argument("--receiver-processes", type=int, default=1)
    parser.add_argument("--per-image", type=int, default=20, help="one-image associations")
    parser.add_argument("--series-per-round", type=int, default=20)
    parser.add_argument("--images-per-series", type=int, default=5)
    parser.add_argument("--echoes", type=int, default=40, help="C-ECHO storm per round")
    parser.add_argument("--rejected", type=int, default=6, help="rejected callers per round")
    parser.add_argument("--probes", type=int, default=10, help="bare TCP connects per round")
    parser.add_argument("--kills", type=int, default=3, help="senders killed per round")
    parser.add_argument("--parallel", type=int, default=3, help="senders at once")
    parser.add_argument("--settle-s", type=float, default=4.0, help="idle time before a sample")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    load = Load(
        per_image=args.per_image,
        series_per_round=args.series_per_round,
        images_per_series=args.images_per_series,
        echoes=args.echoes,
        rejected=args.rejected,
        probes=args.probes,
        kills=args.kills,
    )
    work = Path(tempfile.mkdtemp(prefix="dicom-node-soak-"))
    counts = Counts()
    samples: list[Sample] = []
    try:
        # 1024x1024 images (2 MiB each): a sender killed at a random moment is most
        # likely inside one.
        big = make_mr_series(work / "big", 20, size=1024).folder
        with soak_node(work, args.receiver_processes) as node:
            print(f"node pid {node.pid}, port {node.port}, work folder {work}", flush=True)
            started = time.monotonic()
            time.sleep(args.settle_s)
            samples.append(take_sample(node, started, 0, counts))
            deadline = started + args.minutes * 60
            stop_cli = threading.Event()
            cli = threading.Thread(target=cli_meanwhile, args=(node, counts, stop_cli))
            round_number = 0
            with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
                while time.monotonic() < deadline:
                    round_number += 1
                    if round_number == 1:
                        cli.start()
                    one_round(node, counts, load, work, big, round_number, pool)
                    time.sleep(args.settle_s)
                    samples.append(take_sample(node, started, round_number, counts))
                    print(
                        f"round {round_number}: {counts.associations} associations, "
                        f"{time.monotonic() - started:.0f} s",
                        flush=True,
                    )
            stop_cli.set()
            if cli.is_alive():
                cli.join()
            time.sleep(args.settle_s)
            samples.append(take_sample(node, started, round_number + 1, counts))
            log = node.log_text()
            stored = node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
            series_rows = node.query("SELECT COUNT(*) AS n FROM series")[0]["n"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"receiver_processes {args.receiver_processes}: {counts.associations} connections, "
        f"{counts.images} images acknowledged ({stored} instance rows, {series_rows} series), "
        f"{counts.series} series sent, {counts.killed} senders killed, {counts.stalled} "
        f"stalled, {counts.rejected} rejected, {counts.echoes} echoes, {counts.probes} "
        f"probes, {counts.cli_calls} CLI calls"
    )
    print("idle samples (after each round); per process: RSS MiB, fds, sockets, index fds, threads")
    print(table(samples))
    print()
    print("WARNING/ERROR lines by message:")
    for message, number in grouped_log_lines(log).most_common(25):
        print(f"  {number:>6}  {message}")
    tracebacks = log.count("Traceback (most recent call last)")
    for failure in counts.failures:
        print(f"driver: {failure}")
    grown = verdict(samples)
    print()
    if grown == ["too few rounds for a verdict (run longer)"]:
        print(f"VERDICT: {grown[0]}")
        return 0
    if grown or tracebacks:
        print(
            "VERDICT: GROWS"
            + "".join(f"\n  {line}" for line in grown)
            + (f"\n  {tracebacks} traceback(s) in the log" if tracebacks else "")
        )
        return 1
    print("VERDICT: levels off (no idle figure above the first half's by more than its tolerance)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
