"""config.yaml loading: paths, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import load_settings
from dicom_node.errors import ConfigError


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text("storage: {data_dir: var}\nlogging: {file: log/node.log}\n")
    settings = load_settings(cfg)
    assert settings.storage.data_dir == tmp_path / "etc" / "var"
    assert settings.logging.file == tmp_path / "etc" / "log" / "node.log"
    assert settings.models_dir == tmp_path / "etc" / "var" / "models"


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
        ("nodes: {}", "nodes"),
        ("node: [", "YAML"),
    ],
)
def test_invalid_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(cfg)
