"""Routing: which rule (model, output profile, destinations) a completed series gets.

First match wins. Every rule is evaluated with its reasons, so ``dicom-node rules test``
can show why a rule fired or did not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.config import RuleMatch, RuleSettings
from dicom_node.modalities import unknown_modality
from dicom_node.sop_classes import not_segmentable

NOT_EVALUATED = "not evaluated: an earlier rule matched"  # a later rule's only reason


@dataclass(frozen=True)
class SeriesFacts:
    """What rules can match on, taken from the index or from the files' headers."""

    series_instance_uid: str
    modality: str = ""
    series_description: str = ""
    protocol_name: str = ""
    image_type: tuple[str, ...] = ()
    body_part_examined: str = ""
    calling_ae_title: str = ""
    image_count: int = 0
    sop_class_uids: tuple[str, ...] = ()  # empty: not known, routed by the rules alone


@dataclass
class RuleVerdict:
    rule: str
    matched: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class RoutingDecision:
    rule: RuleSettings | None
    verdicts: list[RuleVerdict]
    not_images: str | None = None  # why no rule was tried: no model reads such objects

    def explain(self) -> str:
        if self.not_images is not None:
            return f"-> not processed: {self.not_images}; kept"
        lines = []
        for verdict in self.verdicts:
            mark = "MATCH" if verdict.matched else "no"
            lines.append(f"{mark:5} {verdict.rule}: " + "; ".join(verdict.reasons))
        lines.append(
            f"-> {self.rule.name if self.rule else 'no rule matches: kept, not processed'}"
        )
        return "\n".join(lines)

    def summary(self) -> str:
        """Every rule's reasons on one line, for log lines and error messages."""
        return (
            " | ".join(f"{v.rule}: {'; '.join(v.reasons)}" for v in self.verdicts)
            or "no rules configured"
        )


def _check(match: RuleMatch, facts: SeriesFacts) -> tuple[bool, list[str]]:
    ok = True
    reasons: list[str] = []

    def note(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        reasons.append(("" if passed else "NOT ") + text)

    if match.modality is not None:
        passed = facts.modality.upper() in {m.upper() for m in match.modality}
        text = f"modality {facts.modality!r} in {match.modality}"
        unknown = [why for m in match.modality if (why := unknown_modality(m)) is not None]
        if not passed and unknown:  # `MRI`: no device sends it
            text += f" ({'; '.join(unknown)})"
        note(passed, text)
    if match.series_description is not None:
        note(*_searched("series description", match.series_description, facts.series_description))
    if match.protocol_name is not None:
        note(*_searched("protocol name", match.protocol_name, facts.protocol_name))
    if match.image_type_contains is not None:
        have = {v.upper() for v in facts.image_type}
        want = [v.upper() for v in match.image_type_contains]
        note(all(v in have for v in want), f"image type {list(facts.image_type)} has {want}")
    if match.body_part_examined is not None:
        note(
            facts.body_part_examined.upper() in {b.upper() for b in match.body_part_examined},
            f"body part {facts.body_part_examined!r} in {match.body_part_examined}",
        )
    if match.calling_ae_title is not None:
        # Spaces around an AE title are not significant (PS3.5 6.2); the index strips them.
        titles = {t.strip() for t in match.calling_ae_title}
        text = f"calling AE {facts.calling_ae_title!r} in {match.calling_ae_title}"
        passed = facts.calling_ae_title.strip() in titles
        if not passed and facts.calling_ae_title.strip().upper() in {t.upper() for t in titles}:
            # Else the rule never fires and nothing says why: AE titles are compared
            # exactly, as the node admits callers (peers' ae_title).
            text += " (only the case differs: AE titles are compared exactly)"
        note(passed, text)
    if match.min_images is not None:
        note(
            facts.image_count >= match.min_images,
            f"{facts.image_count} >= {match.min_images} images",
        )
    if match.max_images is not None:
        note(
            facts.image_count <= match.max_images,
            f"{facts.image_count} <= {match.max_images} images",
        )
    if not reasons:
        reasons.append("matches every series")
    return ok, reasons


def glob_as_regex(pattern: str, *, literal: bool = False) -> str | None:
    """The regular expression meant, where ``pattern`` reads as a shell wildcard; else None.
    ``literal``: the one for a ``*`` meant as itself instead (``T2\\*``, T2-star).

    ``t1*dixon`` is a valid regex ("t", any number of "1", "dixon") that never finds
    ``t1_vibe_dixon``; ``*vibe*`` is no regex at all. Only a ``*`` after a letter or digit,
    or with nothing to repeat, counts: ``.*``, ``\\*``, ``[...]*``, ``(...)*`` and ``\\w*``
    are regex as meant. (``vibe?`` finds what the wildcard would, and more.)
    """
    out: list[str] = []
    globbed = False
    class_from = -1  # where the open character class's members start; -1: none open
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":  # an escape and what it escapes: \* and \w are no wildcard
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if class_from >= 0:
            if char == "]" and i > class_from:  # first in a class (`[]a]`), `]` is a member
                class_from = -1
        elif char == "[":
            class_from = i + 1 + (pattern[i + 1 : i + 2] == "^")
        elif char == "*" and _wildcard_star(pattern, i):
            out.append("\\" if literal else ".")
            globbed = True
        out.append(char)
        i += 1
    return "".join(out) if globbed else None


def _wildcard_star(pattern: str, i: int) -> bool:
    """Whether the (unescaped, unbracketed) ``*`` at ``i`` repeats a letter or digit, or
    nothing (first, or after ``(`` or ``|``: no regex)."""
    if i == 0:
        return True
    before = pattern[i - 1]
    return (before.isalnum() or before in "(|") and not _escaped(pattern, i - 1)


def _escaped(pattern: str, i: int) -> bool:
    """Whether the character at ``i`` is escaped (an odd run of backslashes before it)."""
    run = len(pattern[:i]) - len(pattern[:i].rstrip("\\"))
    return run % 2 == 1


def _searched(what: str, pattern: str, value: str) -> tuple[bool, str]:
    """Whether the regular expression is found in the value, and the reason to show."""
    found = re.search(pattern, value) is not None
    text = f"{what} {value!r} ~ /{pattern}/"
    if not found and re.search(pattern, value, re.IGNORECASE) is not None:
        # Modality, body part and Image Type are matched without regard to case, these are
        # not: a rule written `vibe` for `t1_VIBE_...` otherwise never fires, unexplained.
        text += f" (only the case differs: /(?i){pattern}/ ignores it)"
    elif not found and (regex := glob_as_regex(pattern)) is not None:
        text += f" (a shell wildcard? as a regular expression: /{regex}/)"
    return found, text


def route(rules: list[RuleSettings], facts: SeriesFacts) -> RoutingDecision:
    not_images = not_segmentable(facts.sop_class_uids)
    if not_images is not None:  # whatever the rules say: e.g. our own SEG sent back
        return RoutingDecision(None, [], not_images)
    verdicts: list[RuleVerdict] = []
    chosen: RuleSettings | None = None
    for rule in rules:
        if chosen is not None:
            verdicts.append(RuleVerdict(rule.name, False, [NOT_EVALUATED]))
            continue
        matched, reasons = _check(rule.match, facts)
        verdicts.append(RuleVerdict(rule.name, matched, reasons))
        if matched:
            chosen = rule
    return RoutingDecision(chosen, verdicts)


def facts_from_folder(path: Path, calling_ae_title: str = "") -> SeriesFacts:
    """Facts of the one series in a folder of DICOM files (headers only)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_node.errors import SeriesError
    from dicom_node.header_values import text
    from dicom_node.instance_attributes import REQUIRED_UIDS, TAG
    from dicom_node.value_warnings import quiet_value_warnings

    series_tag = dict(REQUIRED_UIDS)["SeriesInstanceUID"]
    first = None
    count = 0
    series_uids: set[str] = set()
    sop_classes: set[str] = set()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            # pydicom complains of a misspelled Specific Character Set on each read: a line
            # per file on the terminal, which the node does not log either.
            with quiet_value_warnings():
                ds = dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "SOPClassUID" not in ds:
            continue
        series_uids.add(text(ds, series_tag))
        sop_classes.add(text(ds, TAG["SOPClassUID"]))
        count += 1
        first = first or ds
    if first is None:
        raise SeriesError(f"no DICOM images under {path}")
    if len(series_uids) > 1:
        raise SeriesError(f"{path} holds {len(series_uids)} series; give one series' folder")
    # Read as the node indexes a received series (header_values.text), so that the same
    # series matches the same rules: pydicom read UTF-8 with no declared set as Latin-1.
    image_type = text(first, TAG["ImageType"])
    return SeriesFacts(
        series_instance_uid=text(first, series_tag),
        modality=text(first, TAG["Modality"]),
        series_description=text(first, TAG["SeriesDescription"]),
        protocol_name=text(first, TAG["ProtocolName"]),
        image_type=tuple(v for v in image_type.split("\\") if v),  # as facts_from_index
        body_part_examined=text(first, TAG["BodyPartExamined"]),
        calling_ae_title=calling_ae_title,
        image_count=count,
        sop_class_uids=tuple(sorted(sop_classes)),
    )
