"""What is wrong with the models the routing rules name, as found on this machine.

Without this check a rule naming a model that is not installed (or one the node cannot feed)
shows up only as failed jobs, one per series, after the radiologist waited for a SEG.
Receiving is not affected: the series are stored and can be queued again once the model is
there (``dicom-node series process``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import RuleSettings, Settings
from dicom_node.errors import ModelError
from dicom_node.modalities import unknown_modality
from dicom_node.routing import glob_as_regex
from inference.model_store import ModelInfo, load_model_info


@dataclass(frozen=True)
class RuleProblem:
    text: str
    stops_jobs: bool  # the rule's jobs fail (not merely run a model on other images)

    def __str__(self) -> str:
        return self.text


def rule_model_problems(settings: Settings) -> list[RuleProblem]:
    """Every rule's problems, in rule order."""
    models: dict[str, ModelInfo | ModelError] = {}
    return [p for rule in settings.rules for p in rule_problems(rule, settings.models_dir, models)]


def rule_caller_problems(settings: Settings) -> list[RuleProblem]:
    """Rules on a calling AE title no peer has, where only peers are admitted: they never
    fire for it (``[ct1]`` for the peer ``CT1``: AE titles are compared exactly)."""
    if settings.node.accept_unknown_callers:
        return []
    known = {peer.ae_title.strip() for peer in settings.peers}
    out: list[RuleProblem] = []
    for rule in settings.rules:
        strangers = [t for t in rule.match.calling_ae_title or [] if t.strip() not in known]
        if strangers:
            text = (
                f"rule {rule.name!r}: calling AE {', '.join(map(repr, strangers))} is no "
                "peer's ae_title, and only peers are admitted (node.accept_unknown_callers: "
                "false): it never matches such a caller (AE titles are compared exactly, "
                "case included)"
            )
            out.append(RuleProblem(text, stops_jobs=False))
    return out


def rule_match_problems(settings: Settings) -> list[RuleProblem]:
    """Rules written so that they never fire, or not as meant, though the configuration
    loads: a shell wildcard for a regular expression (``t1*dixon``), a modality code DICOM
    does not define (``MRI``). Warned, not refused: such a rule may still fire for some
    series (``t1*dixon`` for ``t11dixon``; a device's own code)."""
    out: list[RuleProblem] = []
    for rule in settings.rules:
        where = f"rule {rule.name!r}: "
        for key in ("series_description", "protocol_name"):
            pattern = getattr(rule.match, key)
            regex = None if pattern is None else glob_as_regex(pattern)
            if regex is not None:
                text = (
                    f"{key} {pattern!r} reads as a shell wildcard, but is a regular expression "
                    f"searched in the text: write {regex!r}"
                )
                if pattern[:1] != "*":  # `T2*`: a wildcard, or T2-star?
                    literal = glob_as_regex(pattern, literal=True)
                    text += f" (or {literal!r} for the text with its *)"
                out.append(RuleProblem(where + text, stops_jobs=False))
        for code in rule.match.modality or []:
            unknown = unknown_modality(code)
            if unknown is not None:
                text = f"modality {unknown}: only a device sending that very code matches"
                out.append(RuleProblem(where + text, stops_jobs=False))
    return out


def rule_problems(
    rule: RuleSettings, models_dir: Path, models: dict[str, ModelInfo | ModelError] | None = None
) -> list[RuleProblem]:
    """The problems of one rule's model; ``models`` caches models loaded for other rules."""
    models = {} if models is None else models
    if rule.model not in models:
        try:
            models[rule.model] = load_model_info(rule.model, models_dir)
        except ModelError as exc:
            models[rule.model] = exc
    found = models[rule.model]
    where = f"rule {rule.name!r}: "
    if isinstance(found, ModelError):
        return [RuleProblem(where + str(found), stops_jobs=True)]
    out: list[RuleProblem] = []
    unfed = unfeedable(found)
    if unfed:
        out.append(RuleProblem(where + unfed, stops_jobs=True))
    roi = found.descriptor.roi_model
    if roi is not None:
        if roi not in models:
            try:
                models[roi] = load_model_info(roi, models_dir)
            except ModelError as exc:
                models[roi] = exc
        if isinstance(models[roi], ModelError):
            text = f"model {found.name!r} needs ROI model {roi!r} first: {models[roi]}"
            out.append(RuleProblem(where + text, stops_jobs=True))
    wanted = [m.upper() for m in rule.match.modality or []]
    if wanted and found.descriptor.modality not in wanted:
        text = (
            f"matches modality {', '.join(wanted)} but model {found.name!r} was trained on "
            f"{found.descriptor.modality}"
        )
        out.append(RuleProblem(where + text, stops_jobs=False))
    return out


def unfeedable(info: ModelInfo) -> str | None:
    """Why the node cannot give this model its inputs, if it cannot."""
    channels = info.descriptor.input_channels
    if len(channels) == 1 or (len(channels) == 2 and info.descriptor.roi_model is not None):
        return None  # the series; and the ROI model's segmentation of it
    return (
        f"model {info.name!r} needs {len(channels)} input channels ({', '.join(channels)}); "
        "the node feeds a model one series as one channel"
    )
