"""Routing rules as a PACS administrator writes them, mistakes included: what the node says."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from peers import make_mr_series

from dicom_node.config import RuleSettings, load_settings
from dicom_node.errors import ConfigError
from dicom_node.routing import SeriesFacts, route

ROOT = Path(__file__).resolve().parents[1]

PEERS = """
peers:
  - {name: ct1, ae_title: CT1, host: 127.0.0.1, port: 11998}
"""


def _config(tmp_path: Path, rules: str) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{data_dir: {tmp_path / 'var'}}}\n{PEERS}rules:\n{rules}")
    return config


@pytest.mark.parametrize(
    ("rules", "said"),
    [
        ("  - {name: a, model: demo, match: {series_description: '[vibe'}}",
         "invalid regular expression '[vibe'"),
        ("  - {name: a, model: demo, match: {protocol_name: '*vibe*'}}",
         "invalid regular expression '*vibe*'"),
        ("  - {name: a, model: demo, match: {series_desc: vibe}}",
         "match.series_desc: unknown key"),
        ("  - {name: a, model: demo, match: {modality: MR}}",
         "match.modality: Input should be a valid list"),
        ("  - {name: a, model: demo, destinations: [pacs]}",
         "names unknown destinations ['pacs']"),
        ("  - {name: a, model: demo}\n  - {name: a, model: other}",
         "rule names must be unique: ['a']"),
        ("  - {name: a, model: demo, match: {max_images: 0}}",
         "max_images: Input should be greater than or equal to 1"),
        ("  - {name: a, model: demo, match: {min_images: -1}}",
         "min_images: Input should be greater than or equal to 1"),
        ("  - {name: a, model: demo, match: {min_images: true}}",
         "min_images: give a number of images, not true"),
        ("  - {name: a, model: demo, match: {max_images: false}}",
         "max_images: give a number of images, not false"),
        ("  - {name: a, model: demo, match: {min_images: 9, max_images: 3}}",
         "the rule could never match"),
        ("  - {name: a, model: demo, match: {image_type_contains: ['ORIGINAL\\\\W']}}",
         "holds several Image Type values"),
        ("  - {name: a, model: demo, profile: {stack_imagetype: W}}",
         "profile.stack_imagetype: unknown key"),
        ("  - {name: a, model: demo, profile: {stack: Last}}",
         "profile.stack: Input should be 'first' or 'last'"),
        ("  - {name: a, model: demo, stack_image_type: W}",
         "rules[0].stack_image_type: unknown key"),
    ],
)  # fmt: skip
def test_mistakes_stop_the_start_with_the_fix(tmp_path: Path, rules: str, said: str) -> None:
    """Refused when loaded (`serve`, `rules test`), not a rule that silently never fires."""
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, rules))
    assert said in str(caught.value)


def _reasons(rule: dict[str, object], facts: SeriesFacts) -> tuple[bool, str]:
    decision = route([RuleSettings.model_validate(rule)], facts)
    return decision.rule is not None, "; ".join(decision.verdicts[0].reasons)


@pytest.mark.parametrize("key", ["series_description", "protocol_name"])
def test_a_regex_of_other_case_fails_and_says_so(key: str) -> None:
    facts = SeriesFacts("1.2.3", series_description="t1_VIBE_dixon_tra", protocol_name="T1_VIBE")
    matched, why = _reasons({"name": "a", "model": "demo", "match": {key: "vibe"}}, facts)
    # Case-sensitive, as before (a rule may tell `_W` from `_w`); the reason says why.
    assert not matched
    assert "only the case differs: /(?i)vibe/ ignores it" in why
    matched, why = _reasons({"name": "a", "model": "demo", "match": {key: "(?i)vibe"}}, facts)
    assert matched and "case differs" not in why
    # Another text altogether: no hint.
    matched, why = _reasons({"name": "a", "model": "demo", "match": {key: "tse"}}, facts)
    assert not matched and "case differs" not in why


def test_an_empty_regex_matches_every_series() -> None:
    """What the README's "regular expression, searched" means; `rules test` shows `~ //`."""
    matched, why = _reasons(
        {"name": "a", "model": "demo", "match": {"series_description": ""}},
        SeriesFacts("1.2.3", series_description=""),
    )
    assert matched and "~ //" in why


def test_calling_ae_title_as_written() -> None:
    facts = SeriesFacts("1.2.3", calling_ae_title="CT1")
    # Quoted with a space (copied from a PACS form): spaces around a title do not count.
    matched, _ = _reasons(
        {"name": "a", "model": "demo", "match": {"calling_ae_title": [" CT1 "]}}, facts
    )
    assert matched
    matched, why = _reasons(
        {"name": "a", "model": "demo", "match": {"calling_ae_title": ["ct1"]}}, facts
    )
    assert not matched
    assert "only the case differs: AE titles are compared exactly" in why
    matched, why = _reasons(
        {"name": "a", "model": "demo", "match": {"calling_ae_title": ["MR1"]}}, facts
    )
    assert not matched and "case differs" not in why


def test_rules_test_explains_rules_written_in_the_wrong_case(tmp_path: Path) -> None:
    make_mr_series(tmp_path / "series", 3, series_description="t1_VIBE_dixon_tra")
    rules = (
        "  - {name: by-ae, model: demo, match: {calling_ae_title: [ct1]}}\n"
        "  - {name: by-desc, model: demo, match: {series_description: vibe}}\n"
        "  - {name: all-mr, model: demo, match: {modality: [mr]}}\n"
        "  - {name: late, model: demo}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "-c", str(_config(tmp_path, rules)),
         "rules", "test", str(tmp_path / "series"), "--calling-ae", "CT1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "no    by-ae: NOT calling AE 'CT1' in ['ct1'] (only the case differs" in lines[1]
    assert "(only the case differs: /(?i)vibe/ ignores it)" in lines[2]
    # Modality is matched without regard to case: the first rule that matches wins ...
    assert lines[3].startswith("MATCH all-mr: modality 'MR' in ['mr']")
    # ... and the later ones say why they were not tried.
    assert lines[4] == "no    late: not evaluated: an earlier rule matched"
    assert lines[5] == "-> all-mr"


def test_a_rule_on_a_calling_ae_no_peer_has_is_reported(tmp_path: Path) -> None:
    """Only peers are admitted, and AE titles are compared exactly: a rule on `ct1` for the
    peer `CT1` never fired, and nothing said so at start or in `status`."""
    from dicom_node.rule_models import rule_caller_problems

    def problems(rules: str, accept_unknown: bool = False) -> list[str]:
        config = _config(tmp_path, rules)
        if accept_unknown:
            config.write_text(config.read_text() + "node: {accept_unknown_callers: true}\n")
        return [str(p) for p in rule_caller_problems(load_settings(config))]

    rule = "  - {name: ct, model: demo, match: {calling_ae_title: [%s]}}\n"
    (said,) = problems(rule % "ct1, CT1")
    assert said.startswith("rule 'ct': calling AE 'ct1' is no peer's ae_title"), said
    assert problems(rule % "CT1") == []
    assert problems(rule % "ct1", accept_unknown=True) == []
    # What `status` lists (and the node logs at start).
    config = _config(tmp_path, rule % "ct1")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("dicom-node")), "-c", str(config), "status", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "rule 'ct': calling AE 'ct1' is no peer's ae_title" in run.stdout, run.stdout


def _match_problems(tmp_path: Path, rules: str) -> list[str]:
    from dicom_node.rule_models import rule_match_problems

    return [str(p) for p in rule_match_problems(load_settings(_config(tmp_path, rules)))]


@pytest.mark.parametrize(
    ("pattern", "meant", "literal"),
    [
        ("t1*dixon", "t1.*dixon", "t1\\*dixon"),
        ("T2*", "T2.*", "T2\\*"),  # or T2-star, the sequence: both are offered
        ("(?i)T1*dixon", "(?i)T1.*dixon", "(?i)T1\\*dixon"),
    ],
)
def test_a_shell_wildcard_is_reported_with_the_regex_to_write(
    tmp_path: Path, pattern: str, meant: str, literal: str
) -> None:
    """`t1*dixon` is a valid regex ("t", any number of "1", "dixon"): it loaded, and never
    fired for `t1_vibe_dixon_tra`, unexplained (`T1*` fired for any "T"). `T2*` may mean
    T2-star: the warning offered only `T2.*`, which also fires for T2 series."""
    rules = f"  - {{name: a, model: demo, match: {{protocol_name: '{pattern}'}}}}\n"
    (said,) = _match_problems(tmp_path, rules)
    assert said == (
        f"rule 'a': protocol_name {pattern!r} reads as a shell wildcard, but is a regular "
        f"expression searched in the text: write {meant!r} (or {literal!r} for the text "
        "with its *)"
    )


def test_a_shell_wildcard_that_finds_nothing_says_the_regex() -> None:
    facts = SeriesFacts("1.2.3", protocol_name="t1_vibe_dixon_tra")
    rule: dict[str, object] = {"name": "a", "model": "demo"}
    # Matching is as before (a regex); the reason says what to write.
    matched, why = _reasons({**rule, "match": {"protocol_name": "t1*dixon"}}, facts)
    assert not matched
    assert "(a shell wildcard? as a regular expression: /t1.*dixon/)" in why
    matched, _ = _reasons({**rule, "match": {"protocol_name": "t1.*dixon"}}, facts)
    assert matched


@pytest.mark.parametrize(
    "pattern", [".*", "t1.*dixon", "\\*", "[_ ]*", "(ab)*", "\\w*", "[a*]", "vibe?", "t1_?"]
)
def test_regex_repeats_are_no_wildcard(tmp_path: Path, pattern: str) -> None:
    rules = f"  - {{name: a, model: demo, match: {{series_description: '{pattern}'}}}}\n"
    assert _match_problems(tmp_path, rules) == []


def test_a_modality_dicom_does_not_define_is_reported(tmp_path: Path) -> None:
    """`MRI` loaded and never matched: devices send `MR`. Case is not a mistake (`mr`
    matches `MR`), nor are retired codes older devices still send (`ST`)."""
    rules = "  - {name: a, model: demo, match: {modality: [MRI, mr, SEG, RTSTRUCT, OT, ST]}}\n"
    (said,) = _match_problems(tmp_path, rules)
    assert said == (
        "rule 'a': modality 'MRI' is no DICOM modality code (did you mean 'MR'?): "
        "only a device sending that very code matches"
    )
    matched, why = _reasons(
        {"name": "a", "model": "demo", "match": {"modality": ["MRI"]}},
        SeriesFacts("1.2.3", modality="MR"),
    )
    assert not matched and "'MRI' is no DICOM modality code (did you mean 'MR'?)" in why


def test_status_lists_rules_that_cannot_match_as_written(tmp_path: Path) -> None:
    rules = (
        "  - {name: glob, model: demo, match: {series_description: 't1*dixon'}}\n"
        "  - {name: mri, model: demo, match: {modality: [MRI]}}\n"
    )
    run = subprocess.run(
        [str(Path(sys.executable).with_name("dicom-node")), "-c", str(_config(tmp_path, rules)),
         "status", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "rule 'glob': series_description 't1*dixon' reads as a shell wildcard" in run.stdout
    assert "rule 'mri': modality 'MRI' is no DICOM modality code" in run.stdout, run.stdout


def test_the_node_warns_at_start_of_rules_that_cannot_match_as_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dicom_node.scheduler import Scheduler
    from storage.database import Index

    rules = (
        "  - {name: glob, model: demo, match: {series_description: 't1*dixon'}}\n"
        "  - {name: mri, model: demo, match: {modality: [MRI]}}\n"
    )
    settings = load_settings(_config(tmp_path, rules))
    scheduler = Scheduler(settings, Index(f"sqlite:///{tmp_path / 'index.sqlite'}"))
    with caplog.at_level(logging.WARNING, logger="dicom_node.scheduler"):
        scheduler.start()
        scheduler.stop()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("rule 'glob': series_description 't1*dixon' reads") for m in said)
    assert any(m.startswith("rule 'mri': modality 'MRI' is no DICOM modality") for m in said)


def test_rules_test_of_a_folder_says_the_calling_ae_is_not_known(tmp_path: Path) -> None:
    """A folder's files do not say who sent them: a rule on a calling AE cannot match."""
    make_mr_series(tmp_path / "series", 3, series_description="t1_vibe")
    rules = (
        "  - {name: by-ae, model: demo, match: {calling_ae_title: [CT1]}}\n"
        "  - {name: by-desc, model: demo, match: {series_description: tse}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "-c", str(_config(tmp_path, rules)),
         "rules", "test", str(tmp_path / "series")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("no    by-ae: NOT calling AE '' in ['CT1']"), lines
    assert lines[1].endswith("; calling AE not known for a folder: give --calling-ae")
    assert "calling AE not known" not in lines[2]
