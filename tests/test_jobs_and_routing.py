"""Routing rules and the persisted job/delivery state machines (real SQLite, no network)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_postgres
import yaml
from sqlalchemy import event, select, update
from test_restarts import ExitedProcess

from dicom_node.config import RuleSettings, Settings, WorkerSettings
from dicom_node.errors import DicomNodeError, ModelError
from dicom_node.routing import SeriesFacts, facts_from_folder, route
from dicom_node.scheduler import Scheduler, queue_series
from dicom_node.worker import PermanentJobError, WorkerPool, _Slot, resolve_destinations
from inference.model_store import BUILTIN_MODELS
from storage.database import Index
from storage.instances import (
    InstanceRecord,
    complete_due_series,
    mark_association_released,
    record_instance,
)
from storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    SeriesState,
    SeriesVersion,
    utcnow,
)
from storage.queue import (
    JobSpec,
    cancel_delivery,
    cancel_job,
    cancel_requested,
    claim_delivery,
    claim_job,
    create_job,
    delivery_done,
    delivery_failed,
    fail_job,
    finish_job,
    heartbeat,
    retry_delivery,
    retry_job,
)
from storage.stats import index_counts

ROOT = Path(__file__).resolve().parents[1]

# The throwaway PostgreSQL server and per-test database of test_postgres, for the tests of
# interleavings that only PostgreSQL allows.
postgres_url = test_postgres.postgres_url
fresh_db = test_postgres.fresh_db

RULES = [
    {
        "name": "vibe",
        "match": {
            "modality": ["MR"],
            "series_description": "(?i)vibe|dixon",
            "image_type_contains": ["ORIGINAL"],
            "min_images": 10,
        },
        "model": "vibe",
    },
    {
        "name": "ct",
        "match": {"modality": ["CT"], "body_part_examined": ["ABDOMEN"]},
        "model": "total",
    },
    {"name": "from-ws", "match": {"calling_ae_title": ["WS1"]}, "model": "demo"},
]


def rules() -> list[RuleSettings]:
    return [RuleSettings.model_validate(r) for r in RULES]


def _config(tmp_path: Path, values: dict[str, Any]) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`dicom-node -c CONFIG ARGS`, which must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "-c", str(config), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_first_matching_rule_wins_with_reasons() -> None:
    facts = SeriesFacts(
        "1.2.3",
        modality="MR",
        series_description="t1_vibe_dixon_tra_W",
        image_type=("ORIGINAL", "PRIMARY", "W"),
        calling_ae_title="WS1",
        image_count=120,
    )
    decision = route(rules(), facts)
    assert decision.rule is not None and decision.rule.name == "vibe"
    assert decision.verdicts[2].reasons == ["not evaluated: an earlier rule matched"]
    text = decision.explain()
    assert "MATCH vibe" in text and "-> vibe" in text


def test_rule_reasons_name_what_failed() -> None:
    facts = SeriesFacts("1.2.3", modality="MR", series_description="t2_haste", image_count=5)
    decision = route(rules(), facts)
    assert decision.rule is None
    vibe = decision.verdicts[0]
    assert not vibe.matched
    assert any(r.startswith("NOT series description") for r in vibe.reasons)
    assert any(r.startswith("NOT 5 >= 10 images") for r in vibe.reasons)
    assert "no rule matches: kept, not processed" in decision.explain()


def test_ct_and_calling_ae_rules() -> None:
    ct = route(rules(), SeriesFacts("1", modality="CT", body_part_examined="abdomen"))
    assert ct.rule is not None and ct.rule.name == "ct"
    ws = route(rules(), SeriesFacts("2", modality="OT", calling_ae_title="WS1"))
    assert ws.rule is not None and ws.rule.name == "from-ws"


SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
EVERY_SERIES = [{"name": "all", "match": {}, "model": "demo"}]
NOT_IMAGES = "objects are not images a model reads (CT, MR and PET images are)"


def test_objects_no_model_reads_are_never_routed() -> None:
    """Not even by a rule matching every series: a PACS that forwards whole studies sends
    the node its own SEG back, and a SEG of that SEG would go round again."""
    every = [RuleSettings.model_validate(r) for r in EVERY_SERIES]
    seg = route(every, SeriesFacts("1", modality="SEG", sop_class_uids=(SEGMENTATION,)))
    assert seg.rule is None and seg.verdicts == []
    assert seg.not_images == f"Segmentation Storage {NOT_IMAGES}"
    assert seg.explain() == f"-> not processed: Segmentation Storage {NOT_IMAGES}; kept"
    others = route(every, SeriesFacts("2", sop_class_uids=(PRESENTATION_STATE, COMPREHENSIVE_SR)))
    assert others.not_images == (
        f"Comprehensive SR Storage, Grayscale Softcopy Presentation State Storage {NOT_IMAGES}"
    )
    # Images among other objects, or classes not known (facts from elsewhere): the rules decide.
    for classes in [(MR_IMAGE, COMPREHENSIVE_SR), ()]:
        decision = route(every, SeriesFacts("3", modality="MR", sop_class_uids=classes))
        assert decision.rule is not None and decision.not_images is None


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return Index(f"sqlite:///{tmp_path / 'index.sqlite'}")


def _complete_series(
    index: Index,
    uid: str = "1.2.3",
    ae: str = "PACS",
    n: int = 3,
    *,
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.4",
    modality: str = "MR",
) -> int:
    for i in range(n):
        record_instance(
            index,
            InstanceRecord(
                sop_instance_uid=f"{uid}.{i}",
                series_instance_uid=uid,
                study_instance_uid="1.2",
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"x/{i}.dcm",
                size_bytes=1,
                modality=modality,
                series_description="t1_vibe",
                image_type="ORIGINAL\\PRIMARY",
                calling_ae_title=ae,
            ),
        )
    done = complete_due_series(index, 0.0, on_release=False)
    return done[0].series_version_pk


def test_scheduler_queues_one_job_per_version_and_rule(index: Index) -> None:
    version_pk = _complete_series(index, n=12)
    settings = Settings(rules=rules())
    scheduler = Scheduler(settings, index)
    assert scheduler.route_pending() == 1
    assert scheduler.route_pending() == 0  # routed once, even when asked again
    spec = JobSpec("vibe", "vibe", {}, ["origin"])
    assert create_job(index, version_pk, spec) is None  # one job per (version, rule)


def test_a_later_version_is_routed_on_the_whole_series_its_job_reads(index: Index) -> None:
    """Three late images of a 12-image series: version 2's job segments all 15, so the
    rules must see 15, not 3 (min_images: 10 left it unprocessed; a rule for small
    series would have sent the whole series to another model)."""
    _complete_series(index, n=12)
    scheduler = Scheduler(Settings(rules=rules()), index)
    assert scheduler.route_pending() == 1
    for i in range(12, 15):  # new images, after completion: version 2
        record_instance(
            index,
            InstanceRecord(
                sop_instance_uid=f"1.2.3.{i}", series_instance_uid="1.2.3",
                study_instance_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{i}.dcm", size_bytes=1,
                modality="MR", series_description="t1_vibe", image_type="ORIGINAL\\PRIMARY",
                calling_ae_title="PACS",
            ),
        )  # fmt: skip
    (late,) = complete_due_series(index, 0.0, on_release=False)
    assert (late.version, late.instance_count) == (2, 3)
    assert scheduler.route_pending() == 1
    with index.session() as session:
        jobs = session.execute(select(Job.rule_name, Job.series_version_pk)).all()
    assert sorted(jobs) == [("vibe", late.series_version_pk - 1), ("vibe", late.series_version_pk)]


def test_a_later_version_no_rule_matches_continues_under_the_rule_it_superseded(
    index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A series from the workstation (rule from-ws, by calling AE), forwarded again by the
    PACS before its job ran: version 1's job was superseded ("its job segments every
    image"), and version 2, from another AE title, matched no rule: no SEG at all."""
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore

    settings = Settings(storage={"data_dir": tmp_path}, rules=rules())
    scheduler = Scheduler(settings, index)
    _complete_series(index, ae="WS1", n=3)
    assert scheduler.route_pending() == 1
    _complete_series(index, ae="PACS", n=3)  # the same images again: version 2
    caplog.set_level("INFO", logger="dicom_node.scheduler")
    assert scheduler.route_pending() == 1
    assert "version 2: no routing rule matches (" in caplog.text
    assert (
        "processed under rule from-ws all the same, as was version 1's job 1, which has made "
        "no SEG (queued)" in caplog.text
    )
    ctx = JobContext(settings, index, FileStore(tmp_path / "store", 0, fsync=False), "host:1")
    assert process_one(ctx, _ModelsRaising(ModelError("no model")))  # type: ignore[arg-type]
    with index.session() as session:
        jobs = session.execute(
            select(SeriesVersion.version, Job.rule_name, Job.state, Job.reason)
            .join(SeriesVersion, Job.series_version_pk == SeriesVersion.id)
            .order_by(Job.id)
        ).all()
    assert [tuple(j[:3]) for j in jobs] == [
        (1, "from-ws", JobState.SUCCEEDED),  # superseded: no SEG
        (2, "from-ws", JobState.QUEUED),
    ]
    assert jobs[0].reason.startswith("superseded by version 2")
    # Once a version's job made a SEG, a later version no rule matches is kept (a PACS
    # forwarding the study back would otherwise start a round trip), as is one whose job
    # the operator cancelled.
    with index.session() as session, session.begin():
        session.execute(update(Job).where(Job.id == 2).values(seg_path="results/2/seg.dcm"))
    _complete_series(index, ae="PACS", n=3)  # version 3
    assert scheduler.route_pending() == 0
    assert cancel_job(index, 2) == (JobState.QUEUED, True)
    with index.session() as session, session.begin():
        session.execute(update(Job).where(Job.id == 2).values(seg_path=""))
    _complete_series(index, ae="PACS", n=3)  # version 4: version 3 had no job, 2 cancelled
    assert scheduler.route_pending() == 0


def test_unmatched_series_is_kept_and_logged(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    _complete_series(index, n=2)  # too few images for the vibe rule
    caplog.set_level("INFO")
    assert Scheduler(Settings(rules=rules()), index).route_pending() == 0
    assert "no routing rule matches; kept, not processed" in caplog.text


def test_a_seg_series_is_kept_not_processed(index: Index, caplog: pytest.LogCaptureFixture) -> None:
    _complete_series(index, n=1, sop_class_uid=SEGMENTATION, modality="SEG")
    settings = Settings.model_validate({"rules": EVERY_SERIES})
    caplog.set_level("INFO")
    assert Scheduler(settings, index).route_pending() == 0
    assert f"version 1: kept, not processed: Segmentation Storage {NOT_IMAGES}" in caplog.text
    with pytest.raises(
        DicomNodeError, match=re.escape(f"1.2.3: Segmentation Storage {NOT_IMAGES}")
    ):
        queue_series(settings, index, "1.2.3", "all")  # nor when an operator names a rule
    with index.session() as session:
        assert session.query(Job).count() == 0


def test_the_scheduler_names_rules_whose_jobs_would_fail_when_it_starts(
    index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing model, a model of two input channels, a model of the other modality: said at
    start, once per rule, not only as a failed job per series later."""
    models = tmp_path / "models"
    two = models / "twochannel"
    shutil.copytree(BUILTIN_MODELS["demo"], two)
    descriptor = yaml.safe_load((two / "model.yaml").read_text())
    descriptor.update(name="twochannel", input_channels=["water", "fat"])
    (two / "model.yaml").write_text(yaml.safe_dump(descriptor))
    settings = Settings.model_validate(
        {
            "inference": {"models_dir": str(models)},
            "rules": [
                {"name": "mr", "match": {"modality": ["MR"]}, "model": "demo"},
                {"name": "ct", "match": {"modality": ["CT"]}, "model": "demo"},
                {"name": "vibe", "model": "vibe"},
                {"name": "dixon", "model": "twochannel"},
            ],
        }
    )
    problems = [
        "rule 'ct': matches modality CT but model 'demo' was trained on MR",
        f"rule 'vibe': model 'vibe' is not installed in {models}; available: demo, twochannel "
        "(install one with `dicom-node models add PATH`)",
        "rule 'dixon': model 'twochannel' needs 2 input channels (water, fat); the node feeds "
        "a model one series as one channel",
    ]

    def logged_at_start(settings: Settings) -> list[tuple[str, str]]:
        caplog.clear()
        scheduler = Scheduler(settings, index)
        scheduler.start()
        scheduler.stop()
        return [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.name == "dicom_node.scheduler" and r.levelno >= logging.INFO
        ]

    caplog.set_level("INFO", logger="dicom_node.scheduler")
    assert logged_at_start(settings) == [
        ("WARNING", problems[0]),
        ("WARNING", problems[1] + ": its jobs will fail"),
        ("WARNING", problems[2] + ": its jobs will fail"),
    ]
    # No workers here (they run `dicom-node worker` on other machines, with their own
    # models): the same facts, said as information about this machine only.
    remote = settings.model_copy(update={"workers": WorkerSettings(processes=0)})
    note = (
        " (this node runs no inference workers: the machines running `dicom-node worker` "
        "need the model)"
    )
    assert logged_at_start(remote) == [("INFO", p + note) for p in problems]
    # `dicom-node status` lists the same, for an operator who did not see the start.
    config = _config(
        tmp_path,
        {
            "storage": {"data_dir": str(tmp_path / "var")},
            **settings.model_dump(mode="json", include={"inference", "rules"}),
        },
    )
    status = _cli(config, "status", "--json")
    assert json.loads(status.stdout)["rule_problems"] == problems


def test_a_worker_machine_names_the_rules_whose_model_it_lacks(tmp_path: Path) -> None:
    """`dicom-node worker` on another machine: its own models run the jobs, so it checks them."""
    cfg = _config(
        tmp_path,
        {
            "storage": {"data_dir": str(tmp_path / "var")},
            "rules": [{"name": "vibe", "model": "vibe"}, {"name": "mr", "model": "demo"}],
        },
    )
    args = ["-m", "dicom_node", "-c", str(cfg), "worker", "--processes", "1"]
    worker = subprocess.Popen([sys.executable, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stderr is not None
        first = worker.stderr.readline()
    finally:
        worker.terminate()
        rest = worker.communicate(timeout=60)[1]
    assert "WARNING" in first and "rule 'vibe': model 'vibe' is not installed in " in first, (
        first + rest
    )
    assert first.rstrip().endswith(": jobs of that rule that this worker takes will fail")
    assert "rule 'mr'" not in first + rest
    assert worker.returncode == 0, rest


def test_an_operator_queues_a_kept_series(index: Index) -> None:
    """`series process`: a series no rule matched is processed by the rule named; asking
    again while the job is queued is refused; once finished it runs again under the rule
    as configured now."""
    _complete_series(index, n=2)  # too few images for the vibe rule: kept
    settings = Settings(rules=rules())
    assert Scheduler(settings, index).route_pending() == 0
    with pytest.raises(DicomNodeError, match=r"no routing rule matches.*vibe: .*images"):
        queue_series(settings, index, "1.2.3")
    with pytest.raises(DicomNodeError, match=r"no rule named 'nope' \(rules: vibe, ct, from-ws\)"):
        queue_series(settings, index, "1.2.3", "nope")
    with pytest.raises(DicomNodeError, match="no complete version"):
        queue_series(settings, index, "9.9.9", "vibe")

    queued = queue_series(settings, index, "1.2.3", "vibe")
    assert (queued.rule_name, queued.model_name, queued.version, queued.again) == (
        "vibe", "vibe", 1, False,
    )  # fmt: skip
    job = claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert job is not None and job.id == queued.job_id and job.model_name == "vibe"
    with pytest.raises(DicomNodeError, match=f"job {queued.job_id} .* is running already"):
        queue_series(settings, index, "1.2.3", "vibe")

    fail_job(index, job.id, "model missing", retry_in_s=None, max_attempts=1)
    changed = Settings(
        rules=[RuleSettings.model_validate({**RULES[0], "model": "vibe2",
                                            "profile": {"format": "labelmap"}})]
    )  # fmt: skip
    again = queue_series(changed, index, "1.2.3", "vibe")
    assert again.job_id == queued.job_id and again.again
    rerun = claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert rerun is not None and rerun.model_name == "vibe2" and rerun.attempts == 1
    assert rerun.profile["format"] == "labelmap" and rerun.reason == ""
    # The scheduler does not route the version a second time.
    assert Scheduler(settings, index).route_pending() == 0


def test_series_process_warns_when_the_rule_has_no_usable_model(
    index: Index, tmp_path: Path
) -> None:
    """The job is queued (workers elsewhere may have the model), and the operator is told."""
    _complete_series(index, n=12)
    cfg = _config(tmp_path, {"storage": {"data_dir": str(tmp_path)}, "rules": RULES})
    result = _cli(cfg, "series", "process", "1.2.3", "--json")
    assert json.loads(result.stdout)["rule"] == "vibe"
    assert "WARNING rule 'vibe': model 'vibe' is not installed in " in result.stderr


def test_job_state_machine(index: Index) -> None:
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None
    job = claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert job is not None and job.id == job_id and job.state == JobState.RUNNING
    assert job.attempts == 1
    assert claim_job(index, "host:2", heartbeat_timeout_s=60) is None  # owned by host:1
    assert heartbeat(index, job_id, "host:1")
    assert not heartbeat(index, job_id, "host:2")
    # A transient error: waits, then is claimable again.
    state = fail_job(index, job_id, "IOError: busy", retry_in_s=0.0, max_attempts=3)
    assert state == JobState.RETRY_WAIT
    again = claim_job(index, "host:2", heartbeat_timeout_s=60)
    assert again is not None and again.attempts == 2 and again.worker == "host:2"
    # A permanent error: failed with its reason, never retried automatically.
    assert (
        fail_job(index, job_id, "mixed orientations", retry_in_s=None, max_attempts=3)
        == JobState.FAILED
    )
    assert claim_job(index, "host:3", heartbeat_timeout_s=60) is None
    assert retry_job(index, job_id)
    assert claim_job(index, "host:3", heartbeat_timeout_s=60) is not None


def test_a_job_whose_worker_died_is_taken_over(index: Index) -> None:
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, []))
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    with index.session() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - dt.timedelta(seconds=120))
        )
    taken = claim_job(index, "host:2", heartbeat_timeout_s=60)
    assert taken is not None and taken.worker == "host:2" and taken.attempts == 2


def _just_before(index: Index, statement: str, action: Callable[[], object]) -> list[object]:
    """Run ``action`` on another thread (its own connection) once, just before this
    process's next SQL statement starting with ``statement``; returns what it returned."""
    done: list[object] = []

    def hook(conn: Any, cursor: Any, sql: str, *_args: Any) -> None:
        if not done and sql.startswith(statement):
            done.append(None)
            worker = threading.Thread(target=lambda: done.append(action()))
            worker.start()
            worker.join(30)

    event.listen(index.engine, "before_cursor_execute", hook)
    return done


def test_an_image_committed_while_completion_closes_the_version_keeps_it_open(
    index: Index,
) -> None:
    """Completion read 2/2 images and a released association; another association's image
    committed before its write, and the version was closed on those stale facts (3 images,
    a reason of '2/2', the rest of that association opening version 2)."""

    def image(i: int, association: str) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=f"1.2.3.{i}", series_instance_uid="1.2.3", study_instance_uid="1.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"x/{i}.dcm", size_bytes=1, expected_count=2, association_id=association,
        )  # fmt: skip

    for i in range(2):
        record_instance(index, image(i, "A"))
    mark_association_released(index, "A")
    other = Index(index.engine.url.render_as_string(hide_password=False), migrate=False)
    raced = _just_before(
        index, "UPDATE series_versions", lambda: record_instance(other, image(2, "B"))
    )
    assert complete_due_series(index, 30.0, on_release=True) == []
    assert raced[1:] and raced[1].version == 1  # type: ignore[attr-defined]
    with index.session() as session:
        (version,) = session.scalars(select(SeriesVersion)).all()
        assert (version.state, version.instance_count) == (SeriesState.RECEIVING, 3)
    other.dispose()


@pytest.mark.peers
def test_a_series_deleted_as_it_is_routed_gets_no_job_on_postgresql(
    fresh_db: str, tmp_path: Path
) -> None:
    """`series delete` just after completion, as the scheduler routed the series: its job
    was queued between the deletion's check of the jobs and its commit. The deletion then
    failed on the job's reference, saying `images of it arrived while it was being deleted`,
    and the job ran: the wrong patient's SEG went to the PACS."""
    from storage.filestore import FileStore
    from storage.retention import delete_series

    index = Index(fresh_db)
    _complete_series(index)
    routing = Index(fresh_db, migrate=False)
    scheduler = Scheduler(Settings.model_validate({"rules": EVERY_SERIES}), routing)
    queued: list[int] = []

    def route() -> None:
        queued.append(scheduler.route_pending())

    router = threading.Thread(target=route)

    def hook(conn: Any, cursor: Any, sql: str, *_args: Any) -> None:
        # After the deletion found no job, before it deletes anything: the scheduler routes.
        if sql.startswith("DELETE FROM deliveries") and not router.is_alive() and not queued:
            router.start()
            deadline = time.monotonic() + 20
            while router.is_alive() and not test_postgres.waiting_for_a_lock(fresh_db):
                assert time.monotonic() < deadline, "the scheduler neither ended nor waited"
                time.sleep(0.05)

    event.listen(index.engine, "before_cursor_execute", hook)
    deleted = delete_series(index, FileStore(tmp_path / "store", 0, fsync=False), "1.2.3")
    router.join(30)
    assert deleted.series == ["1.2.3"]
    assert queued == [0]
    with index.session() as session:
        assert session.scalars(select(Job)).all() == []
    routing.dispose()
    index.dispose()


def test_a_cancel_committed_while_a_job_finishes_is_not_overwritten(index: Index) -> None:
    """SQLite ignores FOR UPDATE and begins a transaction only at the first write: finishing
    read RUNNING, an operator's cancel committed, and the finish then wrote SUCCEEDED and
    queued the deliveries the operator had just stopped."""
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    raced = _just_before(index, "UPDATE jobs", lambda: cancel_job(index, job_id))
    finished = finish_job(index, job_id, seg_path="results/1/seg.dcm",
                          seg_sop_instance_uid="2.25.1", timings={},
                          deliveries=[("origin", "pacs")], worker="host:1")  # fmt: skip
    assert raced[1:] == [(JobState.RUNNING, True)]  # the cancel ran in between
    assert finished is False
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.CANCELLED
        assert session.scalars(select(Delivery)).all() == []


def test_a_finish_or_failure_of_a_job_taken_over_is_ignored(index: Index) -> None:
    """The first worker's heartbeat lapsed (the index was away) and another took the job
    over: the first one's late result or failure must not end the second one's run."""
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    with index.session() as session, session.begin():
        session.execute(update(Job).values(heartbeat_at=utcnow() - dt.timedelta(seconds=120)))
    assert claim_job(index, "host:2", heartbeat_timeout_s=60) is not None
    assert not finish_job(index, job_id, seg_path="results/1/a.dcm", seg_sop_instance_uid="2.25.9",
                          timings={}, deliveries=[("origin", "pacs")], worker="host:1")  # fmt: skip
    state = fail_job(index, job_id, "late", retry_in_s=1.0, max_attempts=3, worker="host:1")
    assert state == JobState.RUNNING
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.state, job.worker) == (JobState.RUNNING, "host:2")
    assert finish_job(index, job_id, seg_path="results/1/b.dcm", seg_sop_instance_uid="2.25.8",
                      timings={}, deliveries=[("origin", "pacs")], worker="host:2")  # fmt: skip


def test_a_cancel_of_a_delivery_the_outbox_claims_meanwhile_leaves_it_sending(
    index: Index,
) -> None:
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="results/1/seg.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    with index.session() as session:
        (delivery_id,) = session.scalars(select(Delivery.id)).all()
    raced = _just_before(index, "UPDATE deliveries", lambda: claim_delivery(index, lease_s=60))
    assert cancel_delivery(index, delivery_id) == (DeliveryState.SENDING, False)
    assert len(raced) == 2 and raced[1] is not None  # the outbox claimed it in between
    with index.session() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None and delivery.state == DeliveryState.SENDING


def test_a_job_whose_workers_keep_dying_fails_after_its_attempts(index: Index) -> None:
    """A series that kills each worker taking it (out of memory, a crashing decoder) must
    not be taken over for ever: it stood before every newer job (oldest first)."""
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, []))
    newer = create_job(index, _complete_series(index, "1.2.4"), JobSpec("r", "demo", {}, []))

    def lapse() -> None:
        with index.session() as session, session.begin():
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(heartbeat_at=utcnow() - dt.timedelta(seconds=120))
            )

    for attempt in (1, 2):
        job = claim_job(index, f"host:{attempt}", heartbeat_timeout_s=60, max_attempts=2)
        assert job is not None and job.id == job_id and job.attempts == attempt
        lapse()
    after = claim_job(index, "host:3", heartbeat_timeout_s=60, max_attempts=2)
    assert after is not None and after.id == newer  # the next job, not the doomed one again
    with index.session() as session:
        doomed = session.get(Job, job_id)
        assert doomed is not None and doomed.state == JobState.FAILED
        assert "host:2 stopped (died, or lost the index) in each of its 2 attempts" in (
            doomed.reason
        )


def test_deliveries_back_off_then_dead_letter_then_retry(index: Index) -> None:
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert finish_job(index, job_id, seg_path="results/1/seg.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    delays = []
    for attempt in range(1, 4):
        with index.session() as session, session.begin():  # make it due now
            session.execute(update(Delivery).values(next_attempt_at=utcnow()))
        delivery = claim_delivery(index, lease_s=60)
        assert delivery is not None and delivery.attempts == attempt
        assert claim_delivery(index, lease_s=60) is None  # leased
        state, delay = delivery_failed(
            index,
            delivery.id,
            "refused",
            retryable=True,
            max_attempts=3,
            backoff_initial_s=10,
            backoff_max_s=25,
        )
        delays.append(delay)
    assert delays == [10, 20, None]  # exponential, capped, then dead
    assert state == DeliveryState.DEAD
    with index.session() as session:
        dead = session.get(Delivery, delivery.id)
        assert dead is not None and dead.last_error == "refused"
    assert retry_delivery(index) == 1
    again = claim_delivery(index, lease_s=60)
    assert again is not None and again.attempts == 1
    with index.session() as session, session.begin():  # a very patient outbox.max_attempts
        session.execute(update(Delivery).values(attempts=1100))
    state, delay = delivery_failed(index, again.id, "refused", retryable=True, max_attempts=5000,
                                   backoff_initial_s=10.0, backoff_max_s=25.0)  # fmt: skip
    assert (state, delay) == (DeliveryState.PENDING, 25.0)  # 10.0 * 2**1099 s overflowed


def test_a_send_cut_off_by_a_crash_is_due_again(index: Index) -> None:
    from dicom_node.outbox import release_interrupted

    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert finish_job(index, job_id, seg_path="s", seg_sop_instance_uid="2.25.1", timings={},
                      deliveries=[("origin", "pacs")])  # fmt: skip
    assert claim_delivery(index, lease_s=3600) is not None
    assert claim_delivery(index, lease_s=3600) is None
    assert release_interrupted(index) == 1  # what `serve` does at start
    assert claim_delivery(index, lease_s=3600) is not None


def test_a_succeeded_job_queued_again_stops_sending_its_old_seg(index: Index) -> None:
    """Its worker removes the old SEG before it runs: an unsent delivery of it was
    dead-lettered as "SEG file missing". It waits for the new SEG instead."""
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, ["origin", "archive"]))
    assert job_id is not None
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert finish_job(index, job_id, seg_path="results/1/a.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs"), ("archive", "vna")])  # fmt: skip
    sent = claim_delivery(index, lease_s=60)
    assert sent is not None
    delivery_done(index, sent.id, 0.1)
    assert retry_job(index, job_id)
    assert claim_delivery(index, lease_s=60) is None  # the old SEG is not sent
    with index.session() as session:
        rows = {d.destination: d for d in session.scalars(select(Delivery))}
    unsent = rows["archive" if sent.destination == "origin" else "origin"]
    assert unsent.state == DeliveryState.CANCELLED
    assert unsent.last_error == "job queued again: the new SEG is sent when it finishes"
    assert rows[sent.destination].state == DeliveryState.DELIVERED  # history kept
    # The re-run's SEG goes to both again.
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert finish_job(index, job_id, seg_path="results/1/b.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs"), ("archive", "vna")])  # fmt: skip
    again = [claim_delivery(index, lease_s=60) for _ in range(2)]
    assert {d.seg_path for d in again if d is not None} == {"results/1/b.dcm"}
    assert all(d is not None and d.attempts == 1 for d in again)


@pytest.mark.parametrize("outcome", ["delivered", "failed for good"])
def test_a_send_overtaken_by_a_re_run_leaves_the_new_seg_to_send(
    index: Index, outcome: str
) -> None:
    """The old SEG was being sent when the job's re-run finished and queued its new SEG on
    the delivery: the old send's end marked the new SEG delivered (never sent), or dead."""
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="results/1/old.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    sending = claim_delivery(index, lease_s=60)
    assert sending is not None
    assert retry_job(index, job_id) and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="results/1/new.dcm", seg_sop_instance_uid="2.25.2",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    if outcome == "delivered":
        assert not delivery_done(index, sending.id, 0.5, attempt=sending.attempts)
    else:
        delivery_failed(index, sending.id, "refused", retryable=False, max_attempts=10,
                        backoff_initial_s=1, backoff_max_s=1, attempt=sending.attempts)  # fmt: skip
    again = claim_delivery(index, lease_s=60)  # the new SEG goes
    assert again is not None and again.id == sending.id
    assert (again.seg_path, again.sop_instance_uid, again.attempts) == (
        "results/1/new.dcm",
        "2.25.2",
        1,
    )


@pytest.mark.parametrize("outcome", ["delivered", "failed for good"])
def test_a_send_overtaken_by_a_re_run_another_node_is_sending_keeps_that_send(
    index: Index, outcome: str
) -> None:
    """As above, but another node's outbox had already claimed the new SEG when the old send
    ended: the re-run reset the attempt count, so both claims were attempt 1, and the old
    send's end marked the new SEG delivered (never sent) or dead, under the other node."""
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="results/1/old.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    old_send = claim_delivery(index, lease_s=60, sender="node-a:10/x")
    assert old_send is not None
    assert retry_job(index, job_id) and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="results/1/new.dcm", seg_sop_instance_uid="2.25.2",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    new_send = claim_delivery(index, lease_s=60, sender="node-b:20/y")
    assert new_send is not None and new_send.id == old_send.id
    assert new_send.attempts == old_send.attempts == 1
    if outcome == "delivered":
        assert not delivery_done(
            index, old_send.id, 0.5, attempt=old_send.attempts, sender=old_send.sender
        )
    else:
        delivery_failed(index, old_send.id, "refused", retryable=False, max_attempts=10,
                        backoff_initial_s=1, backoff_max_s=1, attempt=old_send.attempts,
                        sender=old_send.sender)  # fmt: skip
    with index.session() as session:
        row = session.get(Delivery, new_send.id)
        assert row is not None
        assert (row.state, row.sender, row.seg_path) == (
            DeliveryState.SENDING,
            "node-b:20/y",
            "results/1/new.dcm",
        )
    # The new send's own end is recorded.
    assert delivery_done(index, new_send.id, 0.5, attempt=new_send.attempts, sender=new_send.sender)


def test_origin_is_resolved_by_calling_ae_or_refused(index: Index) -> None:
    _complete_series(index, ae="ORTHANC")
    settings = Settings.model_validate(
        {"peers": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]}
    )
    with index.session() as session:
        series = session.query(Series).one()
        assert resolve_destinations(settings, series, ["origin"]) == [("origin", "pacs")]
        series.calling_ae_title = "STRANGER"
        with pytest.raises(PermanentJobError, match=r"STRANGER.*not a configured peer"):
            resolve_destinations(settings, series, ["origin"])


def test_rules_test_cli_on_a_folder(tmp_path: Path) -> None:
    from dicom_phantoms import write_series

    write_series(tmp_path / "series", lambda p: p[:, 0] * 0 + 100.0, shape=(4, 8, 8))

    def rules_test(model: str) -> str:
        rule = {"name": "mr", "match": {"modality": ["MR"]}, "model": model}
        cfg = _config(tmp_path, {"rules": [rule]})
        return _cli(cfg, "rules", "test", str(tmp_path / "series")).stdout

    shown = rules_test("demo")
    assert "MATCH mr" in shown and "-> mr" in shown
    assert "4 images" in shown
    assert "WARNING" not in shown
    # A rule whose model is not installed: the match is shown, and why its job would fail.
    shown = rules_test("vibe")
    assert "-> mr" in shown
    assert "WARNING rule 'mr': model 'vibe' is not installed in " in shown


def test_facts_from_folder_refuses_several_series(tmp_path: Path) -> None:
    from dicom_phantoms import write_series

    from dicom_node.errors import SeriesError

    write_series(tmp_path / "a", lambda p: p[:, 0] * 0 + 1.0, shape=(2, 4, 4))
    write_series(tmp_path / "b", lambda p: p[:, 0] * 0 + 1.0, shape=(2, 4, 4))
    with pytest.raises(SeriesError, match="2 series"):
        facts_from_folder(tmp_path)


def _job(index: Index, job_id: int) -> Job:
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


class _ModelsRaising:
    """A model cache whose model cannot be had: stands for an error anywhere in a job."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get(self, name: str) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "state", "outcome"),
    [
        # Last session's Siemens XA30 image failed three times in a row with this one.
        (
            AttributeError("'Dataset' object has no attribute 'PixelMeasuresSequence'"),
            JobState.FAILED,
            "not retried: it fails the same way each time",
        ),
        (KeyError("Rows"), JobState.FAILED, "not retried"),
        (OSError(28, "No space left on device"), JobState.RETRY_WAIT, "will retry"),
        (MemoryError(), JobState.RETRY_WAIT, "will retry"),
    ],
)
def test_an_unexpected_error_is_retried_only_when_it_may_pass(
    index: Index,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exc: Exception,
    state: JobState,
    outcome: str,
) -> None:
    """The same series, model and code fail the same way again: such a job fails at once
    with its error (and traceback in the log) instead of after max_attempts runs of the
    whole inference. A full disk or a short memory may pass: that job waits and retries."""
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    settings = Settings(storage={"data_dir": tmp_path}, workers={"max_attempts": 3})
    ctx = JobContext(settings, index, FileStore(tmp_path / "store", 0, fsync=False), "host:1")
    caplog.set_level("ERROR", logger="dicom_node.worker")
    assert process_one(ctx, _ModelsRaising(exc))  # type: ignore[arg-type]
    job = _job(index, job_id)
    assert (job.state, job.attempts) == (state, 1)
    assert job.reason == f"{type(exc).__name__}: {exc}"
    (record,) = [r for r in caplog.records if r.name == "dicom_node.worker"]
    assert f"job {job_id} study " in record.getMessage() and f"({outcome}" in record.getMessage()
    assert record.exc_info is not None  # the traceback, for a bug report


@pytest.mark.parametrize(
    "exc", [ModelError("no model 'vibe' installed"), OSError(28, "No space left on device")]
)
def test_a_job_error_is_logged_even_when_the_index_cannot_record_it(
    index: Index,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
) -> None:
    """The index went away between the claim and the failure: recording it raises, the job
    runs again later, and its error must still be in the log with the job's tag."""
    from dicom_node import worker
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    ctx = worker.JobContext(
        Settings(storage={"data_dir": tmp_path}),
        index,
        FileStore(tmp_path / "store", 0, fsync=False),
        "host:1",
    )

    def away(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the index did not answer")

    monkeypatch.setattr(worker, "fail_job", away)
    caplog.set_level("ERROR", logger="dicom_node.worker")
    with pytest.raises(RuntimeError, match="did not answer"):
        worker.process_one(ctx, _ModelsRaising(exc))  # type: ignore[arg-type]
    logged = [r.getMessage() for r in caplog.records if r.name == "dicom_node.worker"]
    assert any(f"job {job_id} study " in m and str(exc) in m for m in logged), logged


def test_a_job_starts_with_no_result_files_but_its_own(index: Index, tmp_path: Path) -> None:
    """SQLite gives a deleted job's number again: a BINARY fallback left in its results
    folder (a crash between a prune's commit and its file removal) was sent as the new job's
    fallback, another patient's SEG, to a PACS that refuses Label Map SEGs."""
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    store = FileStore(tmp_path / "store", 0, fsync=False)
    left = store.result_path(job_id, "fallback-binary.dcm")
    store.write_atomic(left, b"DICM another series' SEG")
    ctx = JobContext(Settings(storage={"data_dir": tmp_path}), index, store, "host:1")
    assert process_one(ctx, _ModelsRaising(ModelError("no model")))  # type: ignore[arg-type]
    assert store.job_results(job_id) == []
    assert not store.absolute(left).exists()


def test_a_worker_whose_job_was_taken_over_leaves_the_new_runs_seg(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SEG's file name is its UID, the same for every run of a job: the worker whose
    heartbeat lapsed removed the SEG the new run had made and queued for sending."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_node.segment import SegmentResult
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    store = FileStore(tmp_path / "store", 0, fsync=False)
    seg = Dataset()
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.SOPInstanceUID = "2.25.42"
    seg.file_meta = FileMetaDataset()
    seg.file_meta.MediaStorageSOPClassUID = seg.SOPClassUID
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg_rel = store.result_path(job_id, "2.25.42.dcm")

    def taken_over_while_running(*args: object, **kwargs: object) -> SegmentResult:
        with index.session() as session, session.begin():  # host:1's heartbeat lapsed
            session.execute(update(Job).values(heartbeat_at=utcnow() - dt.timedelta(hours=1)))
        assert claim_job(index, "host:2", heartbeat_timeout_s=60) is not None
        store.write_atomic(seg_rel, b"DICM the new run's SEG")
        assert finish_job(index, job_id, seg_path=seg_rel, seg_sop_instance_uid="2.25.42",
                          timings={}, worker="host:2")  # fmt: skip
        return SegmentResult(seg, None, [], "1.2", "1.2.3", {})

    monkeypatch.setattr("dicom_node.segment.segment_series", taken_over_while_running)
    ctx = JobContext(Settings(storage={"data_dir": tmp_path}), index, store, "host:1")
    caplog.set_level(logging.WARNING, logger="dicom_node.worker")
    assert process_one(ctx, _ModelsGiving())  # type: ignore[arg-type]
    assert store.absolute(seg_rel).exists()  # the file the new run's deliveries send
    job = _job(index, job_id)
    assert (job.state, job.worker, job.seg_path) == (JobState.SUCCEEDED, "host:2", seg_rel)
    assert "another worker took the job over while this one ran it" in caplog.text


def test_a_run_whose_series_was_deleted_meanwhile_leaves_no_seg(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`jobs cancel` then `series delete` (the wrong patient) before the pool stopped the
    worker: its SEG was written after the deletion and left in the store, as if another
    worker had taken the job over ("its run's result stands")."""
    from dicom_node.segment import SegmentResult
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore
    from storage.retention import delete_series

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    store = FileStore(tmp_path / "store", 0, fsync=False)

    def deleted_while_running(*args: object, **kwargs: object) -> SegmentResult:
        assert cancel_job(index, job_id) == (JobState.RUNNING, True)
        assert delete_series(index, store, "1.2.3").series == ["1.2.3"]
        return SegmentResult(_seg("2.25.42"), None, [], "1.2", "1.2.3", {})

    monkeypatch.setattr("dicom_node.segment.segment_series", deleted_while_running)
    ctx = JobContext(Settings(storage={"data_dir": tmp_path}), index, store, "host:1")
    caplog.set_level(logging.WARNING, logger="dicom_node.worker")
    assert process_one(ctx, _ModelsGiving())  # type: ignore[arg-type]
    assert store.job_results(job_id) == []
    assert "removed while it ran (its series deleted or pruned); its SEG is discarded" in (
        caplog.text
    )
    assert "another worker took the job over" not in caplog.text


def _seg(uid: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_a_run_taken_over_keeps_its_fallback_apart_from_the_new_runs(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SEG's UID follows its content, so the new run of a job taken over (on another
    device: other voxels) may make a SEG of another name; the BINARY fallbacks of both runs
    were one file, fallback-binary.dcm, and the run taken over put its own in place of the
    one the new run's deliveries send. Each fallback is now named after its SEG."""

    from dicom_node.segment import SegmentResult
    from dicom_node.worker import JobContext, fallback_path, process_one
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    store = FileStore(tmp_path / "store", 0, fsync=False)
    new_seg = store.result_path(job_id, "2.25.42.dcm")
    new_fallback = fallback_path(new_seg)
    assert new_fallback == f"results/{job_id}/2.25.42.binary.dcm"

    def taken_over_while_running(*args: object, **kwargs: object) -> SegmentResult:
        with index.session() as session, session.begin():  # host:1's heartbeat lapsed
            session.execute(update(Job).values(heartbeat_at=utcnow() - dt.timedelta(hours=1)))
        assert claim_job(index, "host:2", heartbeat_timeout_s=60) is not None
        store.write_atomic(new_seg, b"DICM the new run's SEG")
        store.write_atomic(new_fallback, b"DICM the new run's fallback")
        assert finish_job(index, job_id, seg_path=new_seg, seg_sop_instance_uid="2.25.42",
                          timings={}, worker="host:2")  # fmt: skip
        return SegmentResult(_seg("2.25.41"), _seg("2.25.43"), [], "1.2", "1.2.3", {})

    monkeypatch.setattr("dicom_node.segment.segment_series", taken_over_while_running)
    ctx = JobContext(Settings(storage={"data_dir": tmp_path}), index, store, "host:1")
    assert process_one(ctx, _ModelsGiving())  # type: ignore[arg-type]
    assert store.absolute(new_fallback).read_bytes() == b"DICM the new run's fallback"
    assert store.absolute(new_seg).read_bytes() == b"DICM the new run's SEG"


class _ModelsGiving:
    def get(self, name: str) -> Any:
        return None, None  # the stand-in segment_series needs no model


def test_status_says_how_long_the_longest_waiting_job_has_waited(index: Index) -> None:
    """What an administrator alerts on when no worker runs jobs (dicom_node_oldest_waiting_
    job_seconds, `status`'s longest wait): queued, or due for a retry; from its retry when
    the operator queued it again."""

    def age_h(job_id: int, **values: object) -> None:
        with index.session() as session, session.begin():
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    assert index_counts(index).oldest_waiting_job_s is None
    first = create_job(index, _complete_series(index, "1.2.3"), JobSpec("r", "demo", {}, []))
    second = create_job(index, _complete_series(index, "1.2.4"), JobSpec("r", "demo", {}, []))
    assert first is not None and second is not None
    hours = dt.timedelta(hours=1)
    age_h(first, created_at=utcnow() - 2 * hours)
    age_h(second, created_at=utcnow() - 1 * hours)
    assert index_counts(index).oldest_waiting_job_s == pytest.approx(7200, abs=60)
    # The first fails, to be retried in an hour: not waiting for a worker until then.
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert fail_job(index, first, "busy", retry_in_s=3600, max_attempts=3) == JobState.RETRY_WAIT
    assert index_counts(index).oldest_waiting_job_s == pytest.approx(3600, abs=60)
    age_h(first, next_attempt_at=utcnow() - 3 * hours)  # due for three hours
    assert index_counts(index).oldest_waiting_job_s == pytest.approx(3 * 3600, abs=60)
    # Failed for good, then queued again by the operator: waiting since then.
    age_h(first, state=JobState.FAILED, next_attempt_at=None)
    age_h(second, state=JobState.SUCCEEDED)
    assert index_counts(index).oldest_waiting_job_s is None
    assert retry_job(index, first)
    assert index_counts(index).oldest_waiting_job_s == pytest.approx(0, abs=60)


def test_a_job_of_a_version_a_later_one_supersedes_makes_no_seg(
    index: Index, tmp_path: Path
) -> None:
    """Version 1's job waited in the queue while the sender sent 4 of its 12 images again:
    their rows belong to version 2 now, and version 1's job segmented the other 8 and sent
    that partial SEG (or, the whole series sent again, failed on no images). Version 2's
    job segments every image; version 1's stops, saying so."""
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index, n=12), JobSpec("r", "demo", {}, []))
    assert job_id is not None
    _complete_series(index, n=4)  # images 0-3 sent again: version 2
    ctx = JobContext(Settings(storage={"data_dir": tmp_path}), index,
                     FileStore(tmp_path / "store", 0, fsync=False), "host:1")  # fmt: skip
    # No model is loaded: the job stops before.
    assert process_one(ctx, _ModelsRaising(ModelError("no model")))  # type: ignore[arg-type]
    job = _job(index, job_id)
    assert job.state == JobState.SUCCEEDED and job.seg_path == ""
    assert job.reason == (
        "superseded by version 2 of the series, received after this one: its job segments "
        "every image; no SEG made here"
    )


def test_retrying_a_job_that_is_not_finished_says_its_state(index: Index, tmp_path: Path) -> None:
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{data_dir: {tmp_path}}}\n")  # its index.sqlite
    run = subprocess.run(
        [str(Path(sys.executable).with_name("dicom-node")), "-c", str(config), "jobs", "retry",
         str(job_id)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert f"job {job_id} is queued: only a failed, cancelled or succeeded job" in run.stderr


def test_retrying_a_job_a_later_version_superseded_says_which_job_to_retry(
    index: Index, tmp_path: Path
) -> None:
    """Retried, version 1's job stopped at once with no SEG (version 2's job segments every
    image), while its cancelled deliveries said "the new SEG is sent when it finishes"."""
    first = create_job(index, _complete_series(index, n=6), JobSpec("r", "demo", {}, ["origin"]))
    assert first is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, first, seg_path="results/1/a.dcm", seg_sop_instance_uid="2.25.1",
                      timings={}, deliveries=[("origin", "pacs")])  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{data_dir: {tmp_path}}}\n")  # its index.sqlite

    def retry() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("dicom-node")), "-c", str(config), "jobs",
             "retry", str(first)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    version_2 = _complete_series(index, n=2)  # two images sent again: version 2, no job yet
    run = retry()
    assert run.returncode == 2, run.stderr
    assert f"job {first} is for version 1 of series 1.2.3, and version 2 came after it" in (
        run.stderr
    ), run.stderr
    assert "`dicom-node series process 1.2.3` segments it" in run.stderr, run.stderr
    second = create_job(index, version_2, JobSpec("r", "demo", {}, ["origin"]))
    assert second is not None
    run = retry()
    assert run.returncode == 2 and f"`dicom-node jobs retry {second}` runs its job" in run.stderr
    assert _job(index, first).state == JobState.SUCCEEDED  # left as it was
    with index.session() as session:
        assert session.scalars(select(Delivery.state)).all() == [DeliveryState.PENDING]


def test_a_cancelled_job_stays_cancelled(index: Index) -> None:
    check_cancel(index)


def check_cancel(index: Index) -> None:
    """Cancelling in each state, and a worker's late report; also run on PostgreSQL."""
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None
    assert cancel_job(index, job_id) == (JobState.QUEUED, True)
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is None  # never runs
    cancelled = _job(index, job_id)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
    assert cancelled.reason == "cancelled by the operator (was queued)"
    assert cancel_job(index, job_id) == (JobState.CANCELLED, False)  # nothing left to cancel
    counts = index_counts(index)  # what metrics and status show: not a failure
    assert counts.jobs["cancelled"] == 1 and counts.jobs_failed_24h == 0
    assert cancel_job(index, 999) is None

    # Running: cancelled at once; what its worker reports afterwards is discarded.
    assert retry_job(index, job_id)
    running = claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert running is not None and not cancel_requested(index, job_id)
    assert cancel_job(index, job_id) == (JobState.RUNNING, True)
    assert cancel_requested(index, job_id)
    assert not finish_job(index, job_id, seg_path="s", seg_sop_instance_uid="2.25.1", timings={},
                          deliveries=[("origin", "pacs")])  # fmt: skip
    late = fail_job(index, job_id, "late error", retry_in_s=0, max_attempts=5)
    assert late == JobState.CANCELLED
    assert _job(index, job_id).reason == "cancelled by the operator (was running)"
    assert claim_delivery(index, lease_s=60) is None  # nothing is sent
    assert claim_job(index, "host:2", heartbeat_timeout_s=0) is None  # and nobody takes it over

    # Waiting for a retry: cancelled too. A failure of its own is no cancel request.
    assert retry_job(index, job_id)
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert fail_job(index, job_id, "busy", retry_in_s=60, max_attempts=5) == JobState.RETRY_WAIT
    assert cancel_job(index, job_id) == (JobState.RETRY_WAIT, True)
    assert retry_job(index, job_id)
    assert claim_job(index, "host:1", heartbeat_timeout_s=60) is not None
    assert fail_job(index, job_id, "bad", retry_in_s=None, max_attempts=5) == JobState.FAILED
    assert not cancel_requested(index, job_id)


def _sleep_until_stopped(stop: Any) -> None:
    while not stop.value:
        time.sleep(0.05)


class _StandInPool(WorkerPool):
    """The real pool and supervisor over stand-in worker processes that only wait: a real
    process for the supervisor to stop, without a model run of uncontrollable length."""

    first_job = 0

    def _spawn(self, number: int) -> _Slot:
        from dicom_node.worker import worker_id

        current = self._context.Value("i", self.first_job)
        stop = self._context.Value("i", 0)
        process = self._context.Process(
            target=_sleep_until_stopped, args=(stop,), name=f"worker-{number}"
        )
        process.start()
        if self.first_job:
            # Claimed as the worker claims it: under its own identity (a job another
            # worker holds is stopped as taken over).
            claimed = claim_job(self.index, worker_id(process.pid), heartbeat_timeout_s=60)
            assert claimed is not None and claimed.id == self.first_job
        self.first_job = 0  # a respawned worker starts idle
        return _Slot(process, current, stop)


def test_cancelling_a_running_job_stops_its_worker(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    version_pk = _complete_series(index)
    job_id = create_job(index, version_pk, JobSpec("r", "demo", {}, []))
    assert job_id is not None
    pool = _StandInPool(Settings(), index, 1)
    pool.first_job = job_id  # claimed by the worker it starts
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    pool.start()
    try:
        first = pool._slots[0].process
        time.sleep(2.5)  # two supervisor rounds: a running job's worker is left alone
        assert first.is_alive()
        assert cancel_job(index, job_id) == (JobState.RUNNING, True)
        deadline = time.monotonic() + 15
        while first.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not first.is_alive()
        # Named as the worker names a job: with its study, series and version.
        assert re.search(
            rf"job {job_id} study \S+ series \S+ v1 was cancelled; stopping its worker",
            caplog.text,
        )
        while pool._slots[0].process is first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool._slots[0].process.is_alive()  # a fresh worker took its place
    finally:
        pool.stop()


def _no_such_pid() -> int:
    """A process id that no process of this PID namespace has."""
    import psutil

    return max(psutil.pids()) + 12345


def test_a_worker_of_another_container_with_this_hostname_keeps_its_job(
    index: Index, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Containers with one hostname (``--network host``, ``hostname:`` alike in compose)
    count their PIDs each from 1: a worker of the other one, alive, looked like a dead
    process of this one, and a starting pool released its running job to any worker."""
    from dicom_node import worker

    pid = _no_such_pid()
    with monkeypatch.context() as other_container:
        # raising=False: the token is what the identity has to carry
        other_container.setattr(worker, "namespace_token", lambda: "0a1b2c3d4e5f", raising=False)
        other_container.setattr(worker.os, "getpid", lambda: pid)
        elsewhere = worker.worker_id()
    with monkeypatch.context() as this_container:
        this_container.setattr(worker.os, "getpid", lambda: pid + 1)
        dead_here = worker.worker_id()  # a worker of this namespace that has ended
    theirs = create_job(index, _complete_series(index, "1.2.3"), JobSpec("r", "demo", {}, []))
    ours = create_job(index, _complete_series(index, "1.2.4"), JobSpec("r", "demo", {}, []))
    assert claim_job(index, elsewhere, heartbeat_timeout_s=60) is not None
    assert claim_job(index, dead_here, heartbeat_timeout_s=60) is not None
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    assert worker.release_orphaned_jobs(index) == 1
    assert heartbeat(index, theirs, elsewhere)  # still theirs
    taken = claim_job(index, "host:9", heartbeat_timeout_s=60)
    assert taken is not None and taken.id == ours and taken.attempts == 2
    assert claim_job(index, "host:10", heartbeat_timeout_s=60) is None
    host = dead_here.split(":")[0]
    # Log lines name a worker host:pid, without its namespace token.
    assert re.search(
        rf"job {ours} study \S+ series \S+ v1: its worker {host}:{pid + 1} is gone; "
        "released for another",
        caplog.text,
    )


def test_a_worker_identity_tells_pid_namespaces_apart_and_reads_as_host_and_pid() -> None:
    import os
    import socket

    from dicom_node.worker import gone_here, namespace_token, worker_id
    from storage.queue import worker_label

    me = worker_id()
    assert worker_label(me) == f"{socket.gethostname()}:{os.getpid()}"
    if os.path.exists("/proc/self/ns/pid"):
        assert me == f"{socket.gethostname()}:{os.getpid()}/{namespace_token()}"
    assert not gone_here(me)  # alive
    assert gone_here(worker_id(_no_such_pid()))
    assert not gone_here(f"{socket.gethostname()}:{_no_such_pid()}/{'f' * 12}")  # elsewhere
    assert not gone_here(f"another-host:{_no_such_pid()}")


def test_a_worker_whose_job_was_taken_over_records_no_empty_result(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The model found nothing, but meanwhile another worker took the job over: the first
    one's finish marked the new run's job succeeded, with no SEG, under it."""
    from dicom_node.seg_encode import EmptySegmentationError
    from dicom_node.worker import JobContext, process_one
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert job_id is not None

    def taken_over_then_empty(*args: object, **kwargs: object) -> None:
        with index.session() as session, session.begin():  # host:1's heartbeat lapsed
            session.execute(update(Job).values(heartbeat_at=utcnow() - dt.timedelta(hours=1)))
        assert claim_job(index, "host:2", heartbeat_timeout_s=60) is not None
        raise EmptySegmentationError("no labelled voxel")

    monkeypatch.setattr("dicom_node.segment.segment_series", taken_over_then_empty)
    store = FileStore(tmp_path / "store", 0, fsync=False)
    ctx = JobContext(Settings(storage={"data_dir": tmp_path}), index, store, "host:1")
    caplog.set_level(logging.WARNING, logger="dicom_node.worker")
    assert process_one(ctx, _ModelsGiving())  # type: ignore[arg-type]
    job = _job(index, job_id)
    assert (job.state, job.worker, job.attempts) == (JobState.RUNNING, "host:2", 2)
    assert "another worker took the job over while this one ran it" in caplog.text
    assert "no structure found" not in caplog.text


class _DeadWorker(ExitedProcess):
    """A worker process that was killed (out of memory) while it ran a job."""

    exitcode = -9

    def __init__(self, name: str, pid: int | None) -> None:
        super().__init__(name)
        self.pid = pid  # type: ignore[assignment]


def test_a_supervisor_leaves_a_job_its_dead_worker_lost_to_another_machine(
    index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's heartbeat lapsed (the index was away), a worker elsewhere took the job
    over, then the first died: its supervisor's failure must not end the new attempt."""
    import multiprocessing

    from dicom_node import worker

    pid = _no_such_pid()
    with monkeypatch.context() as patch:
        patch.setattr(worker.os, "getpid", lambda: pid)
        dying = worker.worker_id()
    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert claim_job(index, dying, heartbeat_timeout_s=60) is not None
    with index.session() as session, session.begin():
        session.execute(update(Job).values(heartbeat_at=utcnow() - dt.timedelta(hours=1)))
    assert claim_job(index, "elsewhere:7/0a1b2c3d4e5f", heartbeat_timeout_s=60) is not None
    context = multiprocessing.get_context("spawn")

    def slot(pid: int | None, job: int) -> _Slot:
        process: Any = _DeadWorker("worker-1", pid)
        return _Slot(process, context.Value("i", job), context.Value("i", 0))

    class Pool(WorkerPool):
        def _spawn(self, number: int) -> _Slot:
            return slot(None, 0)  # its replacement, idle

    pool = Pool(Settings(), index, 1)
    pool._slots = [slot(pid, job_id)]
    pool._supervise_once()  # sees it dead, starts another, marks the job it held
    job = _job(index, job_id)
    assert (job.state, job.worker, job.attempts) == (
        JobState.RUNNING,
        "elsewhere:7/0a1b2c3d4e5f",
        2,
    )
    assert not pool._to_fail


class _LiveWorker(_DeadWorker):
    """A worker process still running its job; records being killed."""

    exitcode = None  # type: ignore[assignment]

    def __init__(self, name: str, pid: int | None) -> None:
        super().__init__(name, pid)
        self.killed = False

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        self.killed = True


def test_a_worker_whose_job_was_taken_over_is_stopped_not_run_on(
    index: Index, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its heartbeat looked lapsed (an index outage; a clock stepped 45 s or more) and a
    worker elsewhere took the job: the first ran on to the end, two machines segmenting one
    series at once, and only then found its result not recorded. Its own running job is
    left alone."""
    import multiprocessing

    from dicom_node import worker

    pid = _no_such_pid()
    with monkeypatch.context() as patch:
        patch.setattr(worker.os, "getpid", lambda: pid)
        ours = worker.worker_id()
    first = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, []))
    assert first is not None and claim_job(index, ours, heartbeat_timeout_s=60) is not None
    context = multiprocessing.get_context("spawn")
    process = _LiveWorker("worker-1", pid)
    slot = _Slot(process, context.Value("i", first), context.Value("i", 0))  # type: ignore[arg-type]

    class Pool(WorkerPool):
        def _spawn(self, number: int) -> _Slot:
            return _Slot(
                _LiveWorker("worker-2", None), context.Value("i", 0), context.Value("i", 0)
            )  # type: ignore[arg-type]

    pool = Pool(Settings(), index, 1)
    pool._slots = [slot]
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    pool._supervise_once()  # its own job: runs on
    assert not process.killed and pool._slots[0] is slot

    with index.session() as session, session.begin():
        session.execute(update(Job).values(heartbeat_at=utcnow() - dt.timedelta(hours=1)))
    assert claim_job(index, "elsewhere:7/0a1b2c3d4e5f", heartbeat_timeout_s=60) is not None
    pool._supervise_once()
    assert process.killed and pool._slots[0] is not slot
    assert re.search(
        rf"job {first} .* was taken over by worker elsewhere:7 \(.*\); stopping this "
        "worker's run",
        caplog.text,
    )
    job = _job(index, first)
    assert (job.state, job.worker, job.attempts) == (
        JobState.RUNNING,
        "elsewhere:7/0a1b2c3d4e5f",
        2,
    )
    assert not pool._to_fail and "died" not in caplog.text


def test_the_outbox_records_which_process_sends_a_delivery(
    index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that a node starting takes back only its own interrupted sends."""
    from dicom_node.outbox import Outbox
    from dicom_node.worker import worker_id
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="s", seg_sop_instance_uid="2.25.1", timings={},
                      deliveries=[("origin", "pacs")])  # fmt: skip
    senders = []

    def send(self: Outbox, delivery: Delivery) -> str:
        with index.session() as session:
            row = session.get(Delivery, delivery.id)
            assert row is not None
            senders.append((row.state, row.sender))
        return ""

    monkeypatch.setattr(Outbox, "send", send)
    outbox = Outbox(Settings(), index, FileStore(tmp_path / "store", 0, fsync=False))
    assert outbox.deliver_one()
    assert senders == [(DeliveryState.SENDING, worker_id())]


@pytest.mark.parametrize("outcome", ["refused", "sent"])
def test_a_send_the_index_cannot_record_is_logged_with_its_outcome(
    index: Index,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    outcome: str,
) -> None:
    """The outbox logged a send's outcome only after the index recorded it: with the index
    gone at that moment, the PACS's refusal (or the delivery itself) was in no row and no
    log line."""
    from sqlalchemy.exc import OperationalError

    from dicom_node import outbox as outbox_module
    from dicom_node.errors import DeliveryError
    from dicom_node.outbox import Outbox
    from storage.filestore import FileStore

    job_id = create_job(index, _complete_series(index), JobSpec("r", "demo", {}, ["origin"]))
    assert job_id is not None and claim_job(index, "host:1", heartbeat_timeout_s=60)
    assert finish_job(index, job_id, seg_path="s", seg_sop_instance_uid="2.25.1", timings={},
                      deliveries=[("origin", "pacs")])  # fmt: skip

    def send(self: Outbox, delivery: Delivery) -> str:
        if outcome == "refused":
            raise DeliveryError("PACS answered 0xA700 (Refused: Out of Resources)")
        return ""

    def index_gone(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE deliveries", {}, Exception("server closed the connection"))

    monkeypatch.setattr(Outbox, "send", send)
    monkeypatch.setattr(outbox_module, "delivery_failed", index_gone)
    monkeypatch.setattr(outbox_module, "delivery_done", index_gone)
    outbox = Outbox(Settings(), index, FileStore(tmp_path / "store", 0, fsync=False))
    with pytest.raises(OperationalError):
        outbox.deliver_one()
    said = {
        "refused": "attempt 1 failed: PACS answered 0xA700 (Refused: Out of Resources); "
        "the index could not record it",
        "sent": "SEG 2.25.1 sent in",
    }
    assert said[outcome] in caplog.text
    assert "could not record it" in caplog.text
