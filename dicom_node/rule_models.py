"""What is wrong with the models the routing rules name, found when the node starts.

Without this check a rule naming a model that is not installed (or one the node cannot feed)
shows up only as failed jobs, one per series, after the radiologist waited for a SEG.
Receiving is not affected: the series are stored and can be queued again once the model is
there (``dicom-node series process``).
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.config import RuleSettings, Settings
from dicom_node.errors import ModelError
from inference.model_store import ModelInfo, load_model_info


def rule_model_problems(settings: Settings) -> list[str]:
    """One line per problem of every rule whose jobs would fail or run a model on the wrong
    modality."""
    models: dict[str, ModelInfo | ModelError] = {}
    return [p for rule in settings.rules for p in rule_problems(rule, settings.models_dir, models)]


def rule_problems(
    rule: RuleSettings, models_dir: Path, models: dict[str, ModelInfo | ModelError] | None = None
) -> list[str]:
    """The problems of one rule's model; ``models`` caches models loaded for other rules."""
    models = {} if models is None else models
    if rule.model not in models:
        try:
            models[rule.model] = load_model_info(rule.model, models_dir)
        except ModelError as exc:
            models[rule.model] = exc
    found = models[rule.model]
    if isinstance(found, ModelError):
        return [f"rule {rule.name!r}: {found}; its series' jobs will fail"]
    return [f"rule {rule.name!r}: {p}" for p in _model_problems(rule, found)]


def _model_problems(rule: RuleSettings, info: ModelInfo) -> list[str]:
    out: list[str] = []
    channels = info.descriptor.input_channels
    if len(channels) != 1:
        out.append(
            f"model {info.name!r} needs {len(channels)} input channels ({', '.join(channels)}); "
            "the node feeds a model one series as one channel, so its jobs will fail"
        )
    wanted = [m.upper() for m in rule.match.modality or []]
    if wanted and info.descriptor.modality not in wanted:
        out.append(
            f"matches modality {', '.join(wanted)} but model {info.name!r} was trained on "
            f"{info.descriptor.modality}"
        )
    return out
