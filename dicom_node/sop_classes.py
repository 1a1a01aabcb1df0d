"""Which stored objects are images a model reads: CT, MR and PET, single- and multi-frame.

Everything else the node receives (its own SEGs routed back by a PACS that forwards whole
studies, structured reports, presentation states, key object selections, RT objects) is
stored and kept but never segmented: a SEG of a SEG sent to the PACS that forwards it back
would loop.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
)

SEGMENTABLE = frozenset(
    {
        CTImageStorage,
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        MRImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
        PositronEmissionTomographyImageStorage,
        EnhancedPETImageStorage,
        LegacyConvertedEnhancedPETImageStorage,
    }
)
# Newer than the dictionary of the pydicom we pin.
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
_NAMES = {LABEL_MAP_SEGMENTATION_STORAGE: "Label Map Segmentation Storage"}


def class_names(uids: Iterable[str]) -> str:
    """``Segmentation Storage, Comprehensive SR Storage``: the classes by name, sorted."""
    names = {_NAMES.get(uid) or UID(uid).name or uid or "(no SOP Class UID)" for uid in uids}
    return ", ".join(sorted(names))


def not_segmentable(uids: Iterable[str]) -> str | None:
    """Why no model reads a series of these SOP classes; ``None`` if one of them is an image
    a model reads (or none is known)."""
    classes = set(uids)
    if not classes or classes & SEGMENTABLE:
        return None
    return (
        f"{class_names(classes)} objects are not images a model reads (CT, MR and PET images are)"
    )
