"""Shipped label catalogues: complete codes, laterality, sizes, agreement with the sources."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from dicom_node.errors import ModelError
from inference.catalogue import Catalogue, load_catalogue, parse_catalogue, shipped_catalogues

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SHIPPED = ["demo", "total", "total_mr", "vibe"]


def test_all_expected_catalogues_ship() -> None:
    assert set(SHIPPED) <= set(shipped_catalogues())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_label_is_coded_and_coloured(name: str) -> None:
    catalogue = load_catalogue(name)
    assert catalogue.name == name
    for label in catalogue.labels:
        assert label.category.scheme and label.category.code and label.category.meaning
        assert label.type.scheme == "SCT" and label.type.code.isdigit(), label.name
        assert len(label.color) == 3 and all(0 <= c <= 255 for c in label.color)
    colours = [tuple(label.color) for label in catalogue.labels]
    assert len(set(colours)) == len(colours), "colours should tell labels apart"


@pytest.mark.parametrize("name", SHIPPED)
def test_left_and_right_labels_carry_the_modifier(name: str) -> None:
    for label in load_catalogue(name).labels:
        words = label.name.lower().split("_")
        if "left" in words:
            assert label.modifier is not None and label.modifier.code == "7771000", label.name
        elif "right" in words:
            assert label.modifier is not None and label.modifier.code == "24028007", label.name
        else:
            assert label.modifier is None, label.name


def _dicom_meanings() -> dict[str, set[str]]:
    """SNOMED CT code -> its meanings in DICOM's concept tables (PS3.16, as pydicom ships
    them): an independent source of what each code means."""
    from pydicom.sr._concepts_dict import concepts

    meanings: dict[str, set[str]] = {}
    for by_code in concepts["SCT"].values():
        for code, (meaning, _cids) in by_code.items():
            meanings.setdefault(code, set()).add(meaning.lower())
    return meanings


@pytest.mark.parametrize("name", SHIPPED)
def test_no_label_is_coded_with_a_concept_of_the_other_side(name: str) -> None:
    """TotalSegmentator's csv codes both subclavian arteries 29700009, which DICOM lists as
    the right subclavian artery only: the left one read "right subclavian artery, left".
    A lateralised concept must agree with the label's side (and its modifier)."""
    meanings = _dicom_meanings()
    for label in load_catalogue(name).labels:
        words = set(label.name.lower().split("_"))
        for code in (label.type, label.anatomic_region):
            if code is None or code.scheme != "SCT":
                continue
            said = " ".join(meanings.get(code.code, set()))
            for side, other in (("left", "right"), ("right", "left")):
                if side in words:
                    assert other not in said.split(), (label.name, code.code, said)
            if "left" not in words and "right" not in words:
                assert "left" not in said.split() and "right" not in said.split(), (
                    label.name,
                    code.code,
                    said,
                )


def test_sizes_and_ids() -> None:
    vibe = load_catalogue("vibe")
    assert len(vibe.labels) == 71
    assert sorted(label.id for label in vibe.labels) == [i for i in range(1, 73) if i != 20]
    assert len(load_catalogue("total").labels) == 117
    assert len(load_catalogue("total_mr").labels) == 50
    demo = load_catalogue("demo")
    assert {label.id: label.name for label in demo.labels} == {
        1: "liver",
        2: "spleen",
        3: "kidney_left",
        4: "kidney_right",
    }


def test_validation_refuses_duplicates_and_id_zero() -> None:
    label = {
        "id": 1,
        "name": "a",
        "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
        "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
        "color": [1, 2, 3],
    }
    assert isinstance(parse_catalogue({"name": "x", "labels": [label]}), Catalogue)
    with pytest.raises(ModelError, match="unique"):
        parse_catalogue({"name": "x", "labels": [label, {**label, "name": "b"}]})
    with pytest.raises(ModelError, match="unique"):
        parse_catalogue({"name": "x", "labels": [label, {**label, "id": 2}]})
    with pytest.raises(ModelError):
        parse_catalogue({"name": "x", "labels": [{**label, "id": 0}]})
    with pytest.raises(ModelError, match="not found"):
        load_catalogue("no_such_catalogue")


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("name", "Leber"),
        ("meaning", "Leber (Hepar) \u00fc"),
        ("name", "liver\\left"),
        ("code", "1\t2"),
    ],
)
def test_text_outside_dicoms_default_characters_is_refused(where: str, text: str) -> None:
    """A SEG writes label names and code meanings under the source's character set, which
    is often none (ASCII): "\u00fc" there was invalid (dciodvfy) or came out as "?"."""
    label: dict[str, object] = {
        "id": 1,
        "name": "liver",
        "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
        "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
        "color": [1, 2, 3],
    }
    if where == "name":
        label["name"] = text
    else:
        label["type"] = {"scheme": "SCT", "code": "10200004", "meaning": "Liver", where: text}
    if text == "Leber":
        assert isinstance(parse_catalogue({"name": "x", "labels": [label]}), Catalogue)
        return
    with pytest.raises(ModelError, match="DICOM's default character set"):
        parse_catalogue({"name": "x", "labels": [label]})


def _class_maps() -> dict[str, dict[int, str]]:
    src = (REFERENCE / "totalsegmentator_class_maps.py.txt").read_text()
    start = src.index("class_map = {") + len("class_map = ")
    depth = 0
    for i, ch in enumerate(src[start:], start):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return ast.literal_eval(src[start : i + 1])  # type: ignore[no-any-return]
    raise AssertionError("class_map not closed")


@pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"reference files absent ({REFERENCE}); names not compared"
)
def test_names_match_the_reference_maps() -> None:
    maps = _class_maps()
    for name in ("total", "total_mr"):
        got = {label.id: label.name for label in load_catalogue(name).labels}
        assert got == maps[name], name
    readme = json.loads((REFERENCE / "totalvibesegmentator_labels_from_README.json").read_text())
    expected = {int(k): v for k, v in readme.items() if v != "unused"}
    assert {label.id: label.name for label in load_catalogue("vibe").labels} == expected
