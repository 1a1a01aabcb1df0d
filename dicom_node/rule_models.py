"""What is wrong with the models the routing rules name, found when the node starts.

Without this check a rule naming a model that is not installed (or one the node cannot feed)
shows up only as failed jobs, one per series, after the radiologist waited for a SEG.
Receiving is not affected: the series are stored and can be queued again once the model is
there (``dicom-node series process``).
"""

from __future__ import annotations

from dicom_node.config import RuleSettings, Settings
from dicom_node.errors import ModelError
from inference.model_store import ModelInfo, load_model_info


def rule_model_problems(settings: Settings) -> list[str]:
    """One line per rule whose jobs would fail or run a model on the wrong modality."""
    problems: list[str] = []
    loaded: dict[str, ModelInfo | ModelError] = {}
    for rule in settings.rules:
        if rule.model not in loaded:
            try:
                loaded[rule.model] = load_model_info(rule.model, settings.models_dir)
            except ModelError as exc:
                loaded[rule.model] = exc
        found = loaded[rule.model]
        if isinstance(found, ModelError):
            problems.append(f"rule {rule.name!r}: {found}; its series' jobs will fail")
            continue
        problems.extend(f"rule {rule.name!r}: {p}" for p in _model_problems(rule, found))
    return problems


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
