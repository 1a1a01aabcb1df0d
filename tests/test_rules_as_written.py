"""Routing rules as a PACS administrator writes them, mistakes included: what the node says."""

from __future__ import annotations

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
