"""Receive throughput: the node against DCMTK storescp and Orthanc, measured in one run.

    .venv/bin/python benchmarks/receive.py [--images 300] [--rss-images 1000] [--size 512]
        [--parallel 4] [--fsync both|on|off] [--max-associations 16] [--rounds 1]
        [--receiver-processes 1,2,4] [--database-url postgresql+psycopg://...]

Sender: DCMTK ``storescu +sd +r -xe`` (TCP_NODELAY=1), files in Explicit VR Little Endian.
1. one association, ``--images`` 512x512 16-bit MR images, to: the node (1 receiver
   process), ``storescp`` (TCP_NODELAY=1, writing to a folder) and Orthanc;
2. four parallel storescu processes, ``--images``/4 images each (the same 300 images split
   in four folders), to: ``storescp --fork``, the node with each ``receiver_processes``
   of ``--receiver-processes`` (default: 1, the number of cores and ``--parallel``; the
   best of them is the node's figure), and Orthanc; where a C compiler is installed also
   to ``storescp --fork`` with ``sync_on_close.c`` preloaded, which fdatasyncs each file
   and fsyncs its folder as the node does (storescp syncs nothing): printed for context,
   it has no target;
   With ``--fsync both`` (default) the node runs both with ``storage.fsync: true`` (every
   image on disk before its acknowledgement, as the default config) and ``false`` (no
   fsync, like storescp; Orthanc 1.10 fdatasyncs each file but not its index); ``on``
   runs only the first (and passes no fsync key, so it also runs against versions of the
   node without the option);
Each line also gives the CPU per image of the receiver (its process tree, with the
children storescp --fork reaped) and of the storescu senders, with their medians at the end:
on a machine of few cores their sum bounds the images per second: the end gives, from it,
the four-association ratio the node would reach if it kept every core busy;
3. the node's peak RSS (its whole process tree, sampled every 50 ms with psutil) while it
   receives ``--rss-images`` images on one association.
``--database-url`` runs every node on PostgreSQL (a new database each) instead of its
SQLite index: the index several machines share, with its per-image lock.

Targets: one association node >= 1.0x Orthanc; four associations node >= 0.5x
``storescp --fork``; node RSS < 300 MB. The machine is shared: compare the ratios of one
run, not absolute figures across runs. Each receiver gets a fresh empty folder.
``--rounds N`` repeats sections 1 and 2 N times, interleaved, and prints each round's
ratios and their median (single runs on this VM move by +-15%).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import contextlib

from peers import (
    STORESCP,
    GeneratedSeries,
    NodeProcess,
    Orthanc,
    dcmtk_env,
    free_port,
    make_mr_series,
    port_open,
    require_binary,
    storescu_command,
    wait_until,
)


def send(port: int, folders: list[Path], aec: str) -> float:
    """Run one storescu per folder, all at once; return the wall time until all exit."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_command(port, [folder], aec=aec),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
        for folder in folders
    ]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    elapsed = time.perf_counter() - start
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}):\n{output[-2000:]!r}")
    return elapsed


def build_sync_shim(folder: Path) -> Path | None:
    """Compile ``sync_on_close.c`` (storescp syncing like the node); None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    shim = folder / "sync_on_close.so"
    source = Path(__file__).with_name("sync_on_close.c")
    built = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        print(f"(no synced storescp: {compiler} failed: {built.stderr.strip()[-300:]})")
        return None
    return shim


class StoreSCP:
    def __init__(self, workdir: Path, *, fork: bool, preload: Path | None = None) -> None:
        self.port = free_port()
        self.out = workdir / "out"
        self.out.mkdir(parents=True)
        args = [require_binary(STORESCP), "-dhl", "-od", str(self.out)]
        if fork:
            args.append("--fork")
        env = dcmtk_env()
        if preload is not None:
            env["LD_PRELOAD"] = str(preload)
        self.proc = subprocess.Popen(
            [*args, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        wait_until(lambda: port_open(self.port), timeout_s=30, what="storescp")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PeakRss:
    """Samples the RSS of a process and its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --database-url: a PostgreSQL server's URL; each node gets a new database on it.
DATABASE_SERVER: str | None = None


def fresh_database(name: str) -> str:
    """A new, empty database on ``DATABASE_SERVER`` for one node; its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    assert DATABASE_SERVER is not None
    server = make_url(DATABASE_SERVER)
    database = "bench_" + "".join(c if c.isalnum() else "_" for c in name).lower()
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}"'))
            conn.execute(text(f'CREATE DATABASE "{database}"'))
    finally:
        engine.dispose()
    return server.set(database=database).render_as_string(hide_password=False)


def node(workdir: Path, processes: int, max_associations: int, fsync: bool) -> NodeProcess:
    overrides: dict[str, Any] = {
        "node": {"receiver_processes": processes, "max_associations": max_associations}
    }
    storage: dict[str, Any] = {}
    if not fsync:
        storage["fsync"] = False
    if DATABASE_SERVER is not None:
        storage["database_url"] = fresh_database(workdir.name)
    if storage:
        overrides["storage"] = storage
    started = NodeProcess(workdir, quiet_period_s=30, overrides=overrides).start()
    # The node answers C-ECHO as soon as its first process listens; spawned receiver
    # processes import for a second or two more: wait for all, or they are timed starting.
    wait_until(
        lambda: started.log_text().count("listening as AE") >= processes,
        timeout_s=60,
        what=f"{processes} receiver processes",
    )
    return started


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process, its live descendants and the children it
    has reaped (storescp --fork's per-association processes)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
            if proc is root:
                total += times.children_user + times.children_system
    return total


def senders_cpu_s() -> float:
    """CPU seconds of this process's reaped children: the storescu senders."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# CPU milliseconds per image, by label: (receiver, senders).
CPU: dict[str, list[tuple[float, float]]] = {}
CORES = os.cpu_count() or 1


def cpu_medians(label: str) -> tuple[float, float]:
    """Median CPU per image (ms) over the rounds: (receiver, senders)."""
    pairs = CPU[label]
    return statistics.median(r for r, _ in pairs), statistics.median(s for _, s in pairs)


def timed(
    label: str,
    images: int,
    run: Callable[[], float],
    results: dict[str, list[float]],
    receiver_pid: int | None = None,
) -> None:
    """Run and print one send; with ``receiver_pid``, also the CPU per image of the receiver
    and of the senders (why one receiver is faster than another on a machine of few cores)."""
    before = (tree_cpu_s(receiver_pid) if receiver_pid else 0.0, senders_cpu_s())
    seconds = run()
    results.setdefault(label, []).append(images / seconds)
    line = f"{label:<44} {images:5d} images {seconds:7.2f} s {images / seconds:8.1f} images/s"
    if receiver_pid:
        time.sleep(0.3)  # storescp reaps its per-association children
        receiver = (tree_cpu_s(receiver_pid) - before[0]) * 1000 / images
        senders = (senders_cpu_s() - before[1]) * 1000 / images
        CPU.setdefault(label, []).append((receiver, senders))
        busy = (receiver + senders) * images / seconds / 1000
        line += (
            f"   CPU/image: receiver {receiver:.2f} ms, senders {senders:.2f} ms"
            f" ({busy:.1f} of {CORES} cores busy)"
        )
    print(line)


def run_round(
    tmp: Path,
    series: GeneratedSeries,
    parts: list[Path],
    modes: list[bool],
    maxa: int,
    results: dict[str, list[float]],
    processes_tried: list[int],
    shim: Path | None = None,
) -> None:
    """Sections 1 and 2 once, each receiver fresh and empty."""
    n = len(series.paths)
    p = len(parts)
    tmp.mkdir()

    # 1. one association
    scp = StoreSCP(tmp / "storescp1", fork=False)
    try:
        timed(
            "1 assoc -> storescp",
            n,
            lambda: send(scp.port, [series.folder], "ANY"),
            results,
            scp.proc.pid,
        )
    finally:
        scp.stop()
    orthanc = Orthanc(tmp / "orthanc1").start()
    try:
        timed(
            "1 assoc -> Orthanc",
            n,
            lambda: send(orthanc.dicom_port, [series.folder], "ORTHANC"),
            results,
            orthanc.proc.pid if orthanc.proc else None,
        )
    finally:
        orthanc.stop()
    for fsync in modes:
        one = node(tmp / f"node1-{fsync}", 1, maxa, fsync)
        try:
            timed(
                f"1 assoc -> node{_mode(fsync)}",
                n,
                lambda: send(one.port, [series.folder], one.ae_title),  # noqa: B023
                results,
                one.pid,
            )
        finally:
            one.stop()

    # 2. parallel associations
    scp = StoreSCP(tmp / "storescp4", fork=True)
    try:
        timed(
            f"{p} assoc -> storescp --fork",
            n,
            lambda: send(scp.port, parts, "ANY"),
            results,
            scp.proc.pid,
        )
    finally:
        scp.stop()
    if shim is not None:
        scp = StoreSCP(tmp / "storescp4-synced", fork=True, preload=shim)
        try:
            timed(_synced(p), n, lambda: send(scp.port, parts, "ANY"), results, scp.proc.pid)
        finally:
            scp.stop()
    orthanc = Orthanc(tmp / "orthanc4").start()
    try:
        timed(
            f"{p} assoc -> Orthanc",
            n,
            lambda: send(orthanc.dicom_port, parts, "ORTHANC"),
            results,
            orthanc.proc.pid if orthanc.proc else None,
        )
    finally:
        orthanc.stop()
    for fsync in modes:
        for processes in processes_tried:
            multi = node(tmp / f"node{p}x{processes}-{fsync}", processes, maxa, fsync)
            try:
                timed(
                    f"{p} assoc -> node (receiver_processes {processes}){_mode(fsync)}",
                    n,
                    lambda: send(multi.port, parts, multi.ae_title),  # noqa: B023
                    results,
                    multi.pid,
                )
            finally:
                multi.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rss-images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--fsync", choices=["both", "on", "off"], default="both")
    # Older nodes split max_associations between receiver processes: give them 64.
    parser.add_argument("--max-associations", type=int, default=16)
    # The VM's disk and neighbours move single runs by +-15%: repeat, report the median.
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--receiver-processes",
        type=_counts,
        default=None,
        help="receiver_processes values to try with parallel senders, e.g. 1,2,4 "
        "(default: 1, the number of cores, --parallel)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="run the node on PostgreSQL: a server URL (postgresql+psycopg://user@host:port/"
        "postgres) on which each node gets a new database; default SQLite",
    )
    args = parser.parse_args()
    global DATABASE_SERVER
    DATABASE_SERVER = args.database_url
    processes_tried: list[int] = args.receiver_processes or sorted({1, CORES, args.parallel})
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.fsync]
    maxa = args.max_associations

    with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        series = make_mr_series(tmp / "series", args.images, size=args.size)
        parts: list[Path] = []
        for k in range(args.parallel):
            part = tmp / f"part{k}"
            part.mkdir()
            for path in series.paths[k :: args.parallel]:
                (part / path.name).hardlink_to(path)
            parts.append(part)
        big = make_mr_series(tmp / "rss", args.rss_images, size=args.size, seed=7)
        mb = sum(p.stat().st_size for p in series.paths) / 1e6
        print(
            f"generated {args.images} + {args.rss_images} MR images {args.size}x{args.size} "
            f"uint16 ({mb:.0f} MB per {args.images}) in {time.perf_counter() - t0:.0f} s"
        )
        results: dict[str, list[float]] = {}
        shim = build_sync_shim(tmp)
        for round_number in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"-- round {round_number} of {args.rounds}")
            run_round(
                tmp / f"round{round_number}",
                series,
                parts,
                modes,
                maxa,
                results,
                processes_tried,
                shim,
            )

        # 3. memory while receiving (--rss-images 0: skipped)
        rss: PeakRss | None = None
        if args.rss_images:
            rss_node = node(tmp / "node-rss", 1, maxa, modes[0])
            try:
                with PeakRss(rss_node.pid) as rss:
                    timed(
                        "1 assoc -> node (RSS run)",
                        args.rss_images,
                        lambda: send(rss_node.port, [big.folder], rss_node.ae_title),
                        results,
                    )
            finally:
                rss_node.stop()

    print()
    p = args.parallel
    for fsync in modes:
        mode = _mode(fsync)
        node_one = ratios(results[f"1 assoc -> node{mode}"], results["1 assoc -> Orthanc"])
        # Each round's best receiver_processes: what an administrator would configure.
        node_par = [
            max(each)
            for each in zip(
                *(
                    results[f"{p} assoc -> node (receiver_processes {k}){mode}"]
                    for k in processes_tried
                ),
                strict=True,
            )
        ]
        ratio_par = ratios(node_par, results[f"{p} assoc -> storescp --fork"])
        print(f"one association{mode}:  node / Orthanc        = {node_one}")
        print(f"{p} associations{mode}: node / storescp --fork = {ratio_par}")
        print("  (targets: one association >= 1.0, parallel >= 0.5)")
        if _synced(p) in results:
            synced = ratios(node_par, results[_synced(p)])
            print(f"{p} associations{mode}: node / storescp --fork syncing = {synced}")
    if _synced(p) in results:
        cost = ratios(results[_synced(p)], results[f"{p} assoc -> storescp --fork"])
        print(f"{p} associations: storescp --fork syncing / storescp --fork = {cost}")
        print("  (no target: what the node's per-image file and folder sync costs DCMTK)")
    print()
    print("CPU per image, median of the rounds (receiver process tree; the storescu senders):")
    for label in CPU:
        receiver, senders = cpu_medians(label)
        print(f"  {label:<50} {receiver:5.2f} ms  senders {senders:5.2f} ms")
    print("  (no target: on a machine of few cores, receiver + senders CPU bounds images/s)")
    fork = statistics.median(results[f"{p} assoc -> storescp --fork"])
    for fsync in modes:
        mode = _mode(fsync)
        nodes = [f"{p} assoc -> node (receiver_processes {k}){mode}" for k in processes_tried]
        most = CORES * 1000 / min(sum(cpu_medians(label)) for label in nodes)
        print(
            f"{p} associations{mode}: node / storescp --fork with every core busy "
            f"= {most / fork:.2f}"
        )
    print(
        f"  (no target: {CORES} cores / (node + senders CPU per image) is the most images/s "
        "the node can take, over storescp --fork's measured images/s)"
    )
    if rss is not None:
        peak_mb = rss.peak / 1e6
        print(f"node peak RSS (process tree) receiving {args.rss_images} images = {peak_mb:.0f} MB")
        print("  (target < 300 MB)")


def ratios(ours: list[float], theirs: list[float]) -> str:
    """Each round's ratio; with several rounds, their median first."""
    each = [a / b for a, b in zip(ours, theirs, strict=True)]
    if len(each) == 1:
        return f"{each[0]:.2f}"
    listed = " ".join(f"{r:.2f}" for r in each)
    return f"{statistics.median(each):.2f} median of {len(each)} rounds ({listed})"


def _counts(value: str) -> list[int]:
    counts = sorted({int(part) for part in value.split(",") if part.strip()})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("give receiver process counts of 1 or more, e.g. 1,2,4")
    return counts


def _synced(parallel: int) -> str:
    return f"{parallel} assoc -> storescp --fork, syncing like the node"


def _mode(fsync: bool) -> str:
    return "" if fsync else " [fsync off]"


if __name__ == "__main__":
    main()
