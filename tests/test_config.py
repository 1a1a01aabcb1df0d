"""config.yaml loading: paths, validation messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import config_first
from dicom_node.config import RuleSettings, load_settings
from dicom_node.errors import ConfigError


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text("storage: {data_dir: var}\nlogging: {file: log/node.log}\n")
    settings = load_settings(cfg)
    assert settings.storage.data_dir == tmp_path / "etc" / "var"
    assert settings.logging.file == tmp_path / "etc" / "log" / "node.log"
    assert settings.models_dir == tmp_path / "etc" / "var" / "models"


def test_a_relative_sqlite_index_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    """Not from the working directory: a command run elsewhere would open an empty index."""
    cfg = tmp_path / "etc" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text("storage: {database_url: 'sqlite:///db/index.sqlite'}\n")
    url = load_settings(cfg).storage.effective_database_url
    assert url == f"sqlite:///{tmp_path / 'etc' / 'db' / 'index.sqlite'}"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage: {{data_dir: {tmp_path / 'abs'}}}\n")
    assert load_settings(cfg).storage.data_dir == tmp_path / "abs"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("node: {ae_title: 'WAY TOO LONG AE TITLE'}", "ae_title"),
        ("node: {port: 70000}", "port"),
        ("rules: [{name: r, model: demo, destinations: [nowhere]}]", "nowhere"),
        ("rules: [{name: mr, model: demo}, {name: mr, model: vibe}]", r"rule names .*\['mr'\]"),
        ("rules: [{name: r, model: demo, match: {series_description: '('}}]", "regular expression"),
        ("node: {tls: {enabled: true}}", "tls.certificate"),
        (
            "peers: [{name: pacs, ae_title: DICOMNODE, host: pacs, port: 104}]",
            r"peers \['pacs'\] have this node's own AE title 'DICOMNODE'",
        ),
        (
            "rules: [{name: r, model: demo, profile: {format: binary, compression: rle}}]",
            r"compression 'rle' cannot be used with format 'binary': use one of none, jpeg2000",
        ),
        ("rules: [{name: r, model: demo, profile: {compression: explicit}}]", "compression"),
        (
            "peers: [{name: a, ae_title: STORESCU, host: a, port: 104},"
            " {name: b, ae_title: STORESCU, host: b, port: 104}]",
            r"peers share AE titles \['STORESCU'\]",
        ),
        (
            "peers: [{name: a, ae_title: A, host: a, port: 104}]\n"
            "rules: [{name: r, model: demo, destinations: [a, origin, a]}]",
            r"rule 'r' names destinations twice: \['a'\]",
        ),
        ("node: {port: 11112}\nmetrics: {port: 11112}", "metrics.port 11112 is a DICOM port"),
        (
            "node: {port: 2762, tls: {enabled: true, certificate: c.pem, key: k.pem,"
            " require_client_certificate: false}}",
            "node.tls.port and node.port are both 2762",
        ),
        ("node: {tls: {certificate: c.pem}}", "tls.certificate and tls.key go together"),
        ("node: {max_pdu_bytes: 100}", "0 \\(unlimited\\) or at least 4096"),
        ("node: {max_pdu_bytes: 4294967296}", "max_pdu_bytes"),
        ("completion: {quiet_period_s: 0}", "quiet_period_s"),
        ("completion: {check_interval_s: .inf}", "check_interval_s"),
        ("rules: [{name: r, model: demo, match: {min_images: 50, max_images: 10}}]", "never match"),
        ("rules: [{name: r, model: demo, match: {modality: []}}]", "modality"),
        ("dicomweb: [{name: web, url: pacs/dicom-web}]", "not an http:// or https:// URL"),
        (
            "rules: [{name: r, model: demo, profile: {stack_image_type: 'DIXON\\W'}}]",
            r"'DIXON\\\\W' holds several Image Type values: name one",
        ),
        ("rules: [{name: r, model: demo, profile: {stack_image_type: ' '}}]", "blank"),
        ("rules: [{name: r, model: demo, match: {image_type_contains: [M, '']}}]", "blank"),
        ("storage: {database_url: 'mysql://u@h/db'}", "'mysql' is not supported"),
        ("nodes: {}", "nodes"),
        ("node: [", "YAML"),
    ],
)
def test_invalid_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(cfg)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "--config", "a.yaml"], ["--config", "a.yaml", "serve"]),
        (
            ["series", "list", "--json", "-c", "a.yaml"],
            ["-c", "a.yaml", "series", "list", "--json"],
        ),
        (["--config=a.yaml", "serve"], ["--config=a.yaml", "serve"]),
        (
            ["series", "show", "1.2", "--config=a.yaml"],
            ["--config=a.yaml", "series", "show", "1.2"],
        ),
        # After "--" everything is an argument, even a "-c".
        (["segment", "--", "-c", "x"], ["segment", "--", "-c", "x"]),
    ],
)
def test_config_may_follow_the_command(argv: list[str], expected: list[str]) -> None:
    assert config_first(argv) == expected


@pytest.mark.parametrize("where", ["after", "before"])
def test_the_cli_reads_the_config_named_after_the_command(tmp_path: Path, where: str) -> None:
    """`dicom-node serve --config PATH`, as the issue and the README write it, uses PATH."""
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  data_dir: {tmp_path / 'elsewhere'}\n")
    option = ["--config", str(config)]
    args = ["series", "list", "--json"]
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dicom-node"),
            *(args + option if where == "after" else option + args),
        ],
        cwd=tmp_path,  # no ./config.yaml here: only the option can name the data folder
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert (tmp_path / "elsewhere" / "index.sqlite").exists()


def test_text_output_values_read_as_a_person_would() -> None:
    import datetime as dt

    from dicom_node.cli import human

    assert human(dt.datetime(2026, 12, 6, 15, 39, 37, 311505)) == "2026-12-06 15:39:37 UTC"
    assert human(None) == ""
    assert human(["origin", "pacs"]) == "origin, pacs"
    assert human({"load_s": 0.1234, "inference_s": 7.5}) == "load_s 0.12, inference_s 7.50"
    assert human(3) == "3"


def test_an_invalid_config_lists_one_line_per_problem_with_its_key(tmp_path: Path) -> None:
    """Not pydantic's report: type codes, input reprs and a web link under each error."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "node: {port: 70000}\nnodes: {}\n"
        "rules: [{name: r, model: demo, profile: {compression: explicit}}, {model: x}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    assert str(caught.value).splitlines() == [
        f"configuration {cfg} is invalid:",
        "  node.port: Input should be less than or equal to 65535 (given 70000)",
        "  rules[0].profile.compression: Input should be 'none', 'rle', 'jpegls' or 'jpeg2000' "
        "(given 'explicit')",
        "  rules[1].name: required",
        "  nodes: unknown key (misspelt, or in the wrong section?)",
    ]


def test_image_type_values_are_matched_without_case_or_spaces() -> None:
    rule = RuleSettings.model_validate(
        {
            "name": "r",
            "model": "demo",
            "match": {"image_type_contains": ["original", " m "]},
            "profile": {"stack_image_type": " w"},
        }
    )
    assert rule.match.image_type_contains == ["ORIGINAL", "M"]
    assert rule.profile.stack_image_type == "W"


def test_the_config_allows_exactly_the_compressions_the_seg_encoder_writes() -> None:
    from dicom_node.config import COMPRESSIONS_BY_FORMAT
    from dicom_node.seg_encode import ALLOWED_COMPRESSIONS

    encoder = {
        fmt.value: tuple(c.value for c in comps) for fmt, comps in ALLOWED_COMPRESSIONS.items()
    }
    assert encoder == COMPRESSIONS_BY_FORMAT


LONG = "liver-" + "x" * 123  # 129 characters: one more than the index's name columns


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"rules": [{"name": LONG, "model": "demo"}]}, "rules[0].name"),
        ({"rules": [{"name": "r", "model": LONG}]}, "rules[0].model"),
        ({"peers": [{"name": LONG, "ae_title": "P", "host": "p", "port": 104}]}, "peers[0].name"),
        ({"dicomweb": [{"name": LONG, "url": "http://pacs/dicom-web"}]}, "dicomweb[0].name"),
        ({"rules": [{"name": "r", "model": "demo", "destinations": [LONG]}]}, "destinations[0]"),
    ],
)
def test_a_name_longer_than_its_index_column_is_refused_at_start(
    tmp_path: Path, values: dict[str, object], key: str
) -> None:
    """PostgreSQL enforces the 128 characters of a job's rule and model names and of a
    delivery's destination: such a name passed here, and each of its jobs failed at
    create_job with DataError (SQLite stored it)."""
    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    assert f"{key}: String should have at most 128 characters" in str(caught.value)
    just_fits = json.loads(json.dumps(values).replace(LONG, LONG[:-1]))
    cfg.write_text(yaml.safe_dump(just_fits))
    try:
        load_settings(cfg)
    except ConfigError as exc:  # the destination names no peer: another problem
        assert "at most 128" not in str(exc)


def test_the_name_limit_is_the_length_of_the_index_columns_names_go_into() -> None:
    from dicom_node.config import NAME_LENGTH
    from storage.models import Delivery, Job

    columns = [Job.rule_name, Job.model_name, Delivery.destination, Delivery.resolved_peer]
    assert {c.type.length for c in columns} == {NAME_LENGTH}  # type: ignore[attr-defined]
