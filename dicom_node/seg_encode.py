"""Encode a model's label map as a DICOM Segmentation (the "encode" stage of the pipeline).

``encode_seg`` turns a (z, y, x) label map aligned with its source images into a highdicom
``Segmentation``: BINARY (Segmentation Storage, what most viewers read today) by default, or
LABELMAP (Label Map Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.7: much smaller and faster
to write, read by OHIF 3.9+, dcmqi and Slicer).

Decisions a caller relies on:

* **Segment numbers.** Only labels present in the label map become segments, numbered 1..N in
  ascending order of their catalogue id (highdicom requires 1..N contiguous for BINARY; LABELMAP
  uses the same numbering so both formats of one job agree, and its pixel values are the segment
  numbers). ``segment_mapping`` returns that mapping; each segment also carries the catalogue id
  in its Segment Description ("... (label 12)") and the label name as Tracking ID.
* **Empty labels.** A catalogue label absent from the label map produces no segment and no frames;
  ``label_volumes_ml`` still lists it with 0 ml. A label map with no label at all raises
  ``EmptySegmentationError``: there is nothing for a viewer to show, and a SEG without segments
  is not a valid instance.
* **UIDs.** The Series Instance UID is derived from (source Series Instance UID, model name,
  weights SHA-256, format); the SOP Instance UID also from the source images (and frames)
  segmented and from a digest of the content: the segmented voxels, each segment's name, codes
  and colour, and the model version. Re-running the same model on the same images yields the
  same UIDs, so a PACS holds the result once, not a duplicate per run. Other images (more of
  the series arrived, another stack of it), other voxels or corrected codes are other content,
  so a new SOP Instance UID in the same SEG series: DICOM does not allow new content under an
  old UID, and many PACS (Orthanc by default) keep the first copy of a UID and silently ignore
  a re-send. The compression is left out on purpose: it changes the
  encoding, not the content. Tracking UIDs are derived from (source series, model name, label
  name) so a structure keeps its identity across re-runs with new weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.valuerep import PersonName

from dicom_node import __version__
from dicom_node.errors import DicomNodeError
from dicom_node.header_values import text as header_text
from dicom_node.seg_source_text import SourceText, restore_source_text, source_text
from inference.catalogue import to_dicom_text
from inference.log_context import LabelFilter

logger = logging.getLogger(__name__)
# In a job, each line names it (job, study, series, version): the worker's label.
logger.addFilter(LabelFilter())

__all__ = [
    "EmptySegmentationError",
    "SegCompression",
    "SegFormat",
    "encode_seg",
    "label_volumes_ml",
    "segment_mapping",
]


class EmptySegmentationError(DicomNodeError):
    """The label map contains no labelled voxel, so there is no segment to encode.

    Not a failure of the node: the model found none of its structures in this series. Record
    the job as done with every label at 0 ml (see ``label_volumes_ml``) and send no SEG.
    """


class SegFormat(StrEnum):
    """Which Segmentation IOD to write."""

    BINARY = "binary"
    LABELMAP = "labelmap"


class SegCompression(StrEnum):
    """Pixel data encoding; every one of them is lossless."""

    NONE = "none"  # Explicit VR Little Endian, native pixel data
    RLE = "rle"
    JPEGLS = "jpegls"
    JPEG2000 = "jpeg2000"


_TRANSFER_SYNTAX: dict[SegCompression, UID] = {
    SegCompression.NONE: ExplicitVRLittleEndian,
    SegCompression.RLE: RLELossless,
    SegCompression.JPEGLS: JPEGLSLossless,
    SegCompression.JPEG2000: JPEG2000Lossless,
}

# openjpeg codes no frame with a side under this (highdicom refuses them).
_JPEG2000_MIN_SIDE = 32

# highdicom 0.28 refuses encapsulated syntaxes other than JPEG 2000 for 1-bit BINARY frames
# (RLE and JPEG-LS codecs do not take 1-bit samples); LABELMAP frames are 8/16-bit and take all.
ALLOWED_COMPRESSIONS: dict[SegFormat, tuple[SegCompression, ...]] = {
    SegFormat.BINARY: (SegCompression.NONE, SegCompression.JPEG2000),
    SegFormat.LABELMAP: (
        SegCompression.NONE,
        SegCompression.RLE,
        SegCompression.JPEGLS,
        SegCompression.JPEG2000,
    ),
}

# First part of every UID seed, so our derived UIDs cannot collide with another tool hashing
# the same strings.
_UID_NAMESPACE = "https://dicom-node/seg_encode/v1"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LO_MAX = 64  # characters in a DICOM LO value (labels, descriptions, versions)
_CS_MAX = 16
_COUNT_CHUNK = 1 << 20  # voxels per bincount call


class CodeLike(Protocol):
    """What we read from ``inference.catalogue.Code``."""

    @property
    def scheme(self) -> str: ...

    @property
    def code(self) -> str: ...

    @property
    def meaning(self) -> str: ...


class LabelLike(Protocol):
    """What we read from ``inference.catalogue.Label``."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def category(self) -> CodeLike: ...

    @property
    def type(self) -> CodeLike: ...

    @property
    def modifier(self) -> CodeLike | None: ...

    @property
    def color(self) -> Sequence[int]: ...


class CatalogueLike(Protocol):
    """What we read from ``inference.catalogue.Catalogue``.

    A Protocol rather than an import keeps this module independent of ``inference`` (which
    must not import pydicom) and lets tests pass simple stand-ins.
    """

    @property
    def labels(self) -> Sequence[LabelLike]: ...


def _voxel_counts(label_map: np.ndarray) -> npt.NDArray[np.int64]:
    """Voxels per label value (index = value), in one pass over the array."""
    flat = label_map.reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    # bincount is one linear pass (np.unique would sort 10^8 voxels), but it first converts its
    # input to intp: in chunks that copy stays small (8 MB, not 8 bytes per voxel) and fast.
    size = int(flat.max()) + 1
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_CHUNK):
        counts += np.bincount(flat[start : start + _COUNT_CHUNK], minlength=size)
    return counts


def _check_label_map(label_map: np.ndarray) -> None:
    if label_map.ndim != 3:
        raise ValueError(
            f"label_map must be 3-D (z, y, x); got shape {label_map.shape}. "
            "Add a leading axis of length 1 for a single slice."
        )
    if not (np.issubdtype(label_map.dtype, np.unsignedinteger) or label_map.dtype == np.bool_):
        raise TypeError(
            f"label_map must have an unsigned integer dtype; got {label_map.dtype}. "
            "Cast the model output with .astype(np.uint8) or np.uint16."
        )


def _labels_by_id(catalogue: CatalogueLike) -> dict[int, LabelLike]:
    labels: dict[int, LabelLike] = {}
    for label in catalogue.labels:
        if label.id <= 0:
            raise ValueError(f"catalogue label {label.name!r} has id {label.id}; 0 is background")
        if label.id in labels:
            raise ValueError(f"catalogue has two labels with id {label.id}")
        labels[label.id] = label
    return labels


def label_volumes_ml(
    label_map: np.ndarray,
    voxel_volume_mm3: float,
    catalogue: CatalogueLike,
) -> list[tuple[int, str, float]]:
    """Volume of every catalogue label in millilitres, in catalogue order.

    Labels absent from the label map are listed with 0.0 ml, so the job log and the ``segment``
    output always show the full catalogue (the SEG itself omits them).
    """
    _check_label_map(label_map)
    if voxel_volume_mm3 <= 0:
        raise ValueError(f"voxel_volume_mm3 must be positive; got {voxel_volume_mm3}")
    counts = _voxel_counts(label_map)
    result: list[tuple[int, str, float]] = []
    for label in catalogue.labels:
        n = int(counts[label.id]) if label.id < counts.size else 0
        result.append((label.id, label.name, n * voxel_volume_mm3 / 1000.0))
    return result


def segment_mapping(label_map: np.ndarray, catalogue: CatalogueLike) -> dict[int, int]:
    """Catalogue label id -> SEG segment number for the labels present in ``label_map``.

    Raises ``ValueError`` if the label map holds a value the catalogue does not describe, and
    ``EmptySegmentationError`` if it holds no label at all.
    """
    _check_label_map(label_map)
    present = _present_ids(_voxel_counts(label_map), _labels_by_id(catalogue))
    return {label_id: number for number, label_id in enumerate(present, start=1)}


def _present_ids(counts: npt.NDArray[np.int64], labels: dict[int, LabelLike]) -> list[int]:
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    unknown = [v for v in present if v not in labels]
    if unknown:
        raise ValueError(
            f"label map contains values {unknown[:10]} that the catalogue does not describe; "
            "the model and its catalogue do not match"
        )
    if not present:
        raise EmptySegmentationError(
            "the label map contains no labelled voxel: no structure was found, no SEG to send"
        )
    return present


def _code(code: CodeLike) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.code, scheme_designator=code.scheme, meaning=code.meaning)


_SERIES_DESCRIPTION = 0x0008103E


def _lo(text: str) -> str:
    """Fit a value into an LO element (64 characters, no backslash)."""
    return text.replace("\\", "/")[:_LO_MAX]


def _seg_series_description(model_name: str, model_version: str, source: Dataset) -> str:
    """``SEG <model> <version>: <source series description>``: in a study browser, which
    shows a series' description and not what it references, a radiologist sees which
    series a SEG segments (a study of several SEGs showed each as ``SEG vibe 1.0``). The
    source's text in DICOM's default characters: the SEG's own are written in them."""
    described = to_dicom_text(header_text(source, _SERIES_DESCRIPTION))
    return _lo(f"SEG {model_name} {model_version}" + (f": {described}" if described else ""))


def _content_label(model_name: str) -> str:
    # Content Label is a CS: upper-case letters, digits, space and underscore, 16 characters.
    label = re.sub(r"[^A-Z0-9_ ]", "_", model_name.upper())[:_CS_MAX].strip()
    return label or "SEGMENTATION"


def _person_name(name: str) -> PersonName:
    # A bare "dicom-node" reads as the retired single-component PN form (dciodvfy warns); a
    # trailing caret makes it an explicit family-name-only name, displayed the same.
    return PersonName(name if "^" in name else f"{name}^")


def _check_sha256(weights_sha256: str) -> str:
    digest = weights_sha256.strip().lower()
    if digest.startswith("sha256:"):
        digest = digest[len("sha256:") :]
    if not _SHA256_RE.match(digest):
        raise ValueError(
            "weights_sha256 must be the 64 hexadecimal digits of the weights file's SHA-256 "
            f"(hashlib.sha256(data).hexdigest()); got {weights_sha256!r}"
        )
    return digest


def _source_geometry(source_images: Sequence[Dataset] | Dataset) -> tuple[list[Dataset], int]:
    """The source list and the number of planes it describes."""
    sources = [source_images] if isinstance(source_images, Dataset) else list(source_images)
    if not sources:
        raise ValueError("source_images is empty: at least one source image is required")
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        return sources, int(sources[0].NumberOfFrames)
    multi = [ds for ds in sources if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise ValueError(
            "pass either single-frame images or exactly one multi-frame image, not a mixture "
            f"({len(multi)} of {len(sources)} images are multi-frame)"
        )
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) != 1:
        raise ValueError(f"source images come from {len(series)} series; encode one series")
    return sources, len(sources)


def _for_highdicom(sources: list[Dataset]) -> tuple[list[Dataset], SourceText]:
    """``sources``, the first replaced by a copy highdicom accepts what the standard allows
    in, and the source text ``restore_source_text`` puts back into the SEG.

    highdicom takes the SEG's patient, study, character set and geometry from the first
    source. The copy holds the patient and study values and the character set
    ``source_text`` gives, a multi-frame image's pixel measures and orientation shared
    where its frames hold them each, and a missing slice thickness. Its UIDs and frames are
    the source's, so the SEG references the source as it is; the source itself is left as
    it was.
    """
    sources = [_with_sop_class(ds) for ds in sources]
    first = sources[0]
    # source_text decodes the elements it reads in the dataset it is given: the copy's, so
    # that the source keeps its bytes for the next encode (the binary fallback).
    copied = _own_copy(first)
    changes, text = source_text(copied)
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        shared = _shared_geometry(first)
        if shared is not None:
            changes["SharedFunctionalGroupsSequence"] = [shared]
    elif first.get("SliceThickness") in (None, ""):
        changes["SliceThickness"] = _slice_distance(sources)
    for keyword, value in changes.items():
        if keyword in copied:
            delattr(copied, keyword)
        setattr(copied, keyword, value)
    return [copied, *sources[1:]], text


def _own_copy(ds: Dataset) -> Dataset:
    copied = copy.copy(ds)
    # Its own element table: pydicom decodes a raw element in its table, and would change
    # the source's too. An element to change must be deleted and added anew: pydicom
    # assigns a value to the element object, which the source shares.
    copied._dict = dict(ds._dict)
    return copied


def _with_sop_class(ds: Dataset) -> Dataset:
    """``ds``, or a copy with the SOP Class UID of its file meta where its own is empty, as
    some devices write it (the SEG references each source by its class, Type 1)."""
    if str(ds.get("SOPClassUID", "") or ""):
        return ds
    meta = getattr(ds, "file_meta", None)
    media = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
    if not media:
        raise ValueError(
            f"source image {ds.get('SOPInstanceUID', '?')} has no SOP Class UID, in its "
            "data set or its file meta: the SEG cannot reference it"
        )
    copied = _own_copy(ds)
    copied.pop("SOPClassUID", None)  # added anew: assigning would change the source's too
    copied.SOPClassUID = media
    return copied


def _slice_distance(sources: list[Dataset]) -> float | None:
    """The distance between the slices, as the SEG's slice thickness where the source has
    none (its pixel measures need one); ``None`` for one slice or no geometry."""
    try:
        orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        along = np.sort([float(np.dot(normal, ds.ImagePositionPatient)) for ds in sources])
    except (AttributeError, TypeError, ValueError):
        return None  # highdicom says what it lacks
    if len(along) < 2:
        return None
    return round(float(np.median(np.diff(along))), 6) or None


_FRAME_GEOMETRY = ("PixelMeasuresSequence", "PlaneOrientationSequence")


def _shared_geometry(source: Dataset) -> Dataset | None:
    """The shared functional group item with the frames' common pixel measures and
    orientation added, where the frames hold them each (Siemens XA enhanced MR does; highdicom
    reads them from the shared groups only); ``None`` where there is nothing to add."""
    shared = source.get("SharedFunctionalGroupsSequence") or [Dataset()]
    missing = [keyword for keyword in _FRAME_GEOMETRY if keyword not in shared[0]]
    frames = source.get("PerFrameFunctionalGroupsSequence") or []
    if not missing or not frames:
        return None
    common = Dataset()
    for element in shared[0]:
        common.add(element)
    for keyword in missing:
        values = [frame.get(keyword) for frame in frames]
        if any(value is None for value in values):
            continue
        if any(value != values[0] for value in values[1:]):
            raise ValueError(
                f"the frames of the multi-frame image differ in {keyword}: "
                "a SEG needs one pixel spacing and one orientation"
            )
        setattr(common, keyword, copy.deepcopy(values[0]))  # a few values
    return common


def _plane_positions_of_frames(
    sources: list[Dataset], source_frames: Sequence[int]
) -> list[hd.PlanePositionSequence]:
    if len(sources) != 1 or int(sources[0].get("NumberOfFrames", 1) or 1) < 2:
        raise ValueError("source_frames applies to one multi-frame source image only")
    positions = hd.utils.get_plane_positions_of_image(sources[0])
    if not all(1 <= n <= len(positions) for n in source_frames):
        raise ValueError(f"source_frames must lie in 1..{len(positions)}")
    return [positions[n - 1] for n in source_frames]


def _reference_only(seg: Dataset, frames: set[int]) -> None:
    """Keep only references to the segmented source frames.

    highdicom refers each SEG frame to every source frame at its position; in an image of
    several stacks that includes frames of the stacks that were not segmented.
    """
    for group in seg.PerFrameFunctionalGroupsSequence:
        for derivation in group.get("DerivationImageSequence", []):
            items = derivation.SourceImageSequence
            kept = [i for i in items if int(i.get("ReferencedFrameNumber", 0)) in frames]
            if not kept:
                raise ValueError("a SEG frame references none of the segmented source frames")
            derivation.SourceImageSequence = kept


def _derived_uid(*parts: str) -> UID:
    # A name-based (version 5) UUID as a 2.25 UID (ISO/IEC 9834-8): same parts, same UID.
    # Not pydicom's generate_uid(prefix=None, entropy_srcs=...), which ignores the entropy
    # sources and returns a random UUID when prefix is None. JSON keeps the parts unambiguous.
    name = json.dumps([_UID_NAMESPACE, *parts])
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}")


def seg_uids(
    source_series_uid: str,
    *,
    model_name: str,
    weights_sha256: str,
    format: SegFormat | str = SegFormat.BINARY,
    source_instances: Sequence[str] = (),
    content: str = "",
) -> tuple[UID, UID]:
    """(Series Instance UID, SOP Instance UID) of the SEG of this model on this series.

    ``source_instances``: what was segmented (SOP Instance UIDs, ``uid:frame`` for frames of
    a multi-frame image), in any order; ``content``: a digest of what the SEG says
    (``_content_digest``). Both change the SOP Instance UID only.
    """
    fmt = SegFormat(format)
    digest = _check_sha256(weights_sha256)
    parts = (source_series_uid, model_name, digest, fmt.value)
    inputs = json.dumps(sorted(source_instances))
    instance_parts = (*parts, inputs) if not content else (*parts, inputs, content)
    return _derived_uid("series", *parts), _derived_uid("instance", *instance_parts)


def _content_digest(pixels: np.ndarray, present: Sequence[LabelLike], model_version: str) -> str:
    """What the SEG says, beyond its inputs: the segmented voxels, each segment's name,
    codes and colour, and the model's version. A corrected code, a new model version or other
    voxels (other inference settings) are new content, so a new SOP Instance UID: a PACS
    keeps the first copy of a UID and ignores a re-send under it."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(json.dumps([model_version, list(pixels.shape), str(pixels.dtype)]).encode())
    for label in present:
        described = [label.id, label.name, list(label.color)]
        for attr in ("category", "type", "modifier", "anatomic_region", "anatomic_region_modifier"):
            code = getattr(label, attr, None)
            described.append(None if code is None else [code.scheme, code.code, code.meaning])
        hasher.update(json.dumps(described).encode())
    hasher.update(np.ascontiguousarray(pixels).data)
    return hasher.hexdigest()


def _segmented_instances(
    sources: Sequence[Dataset], source_frames: Sequence[int] | None
) -> list[str]:
    if source_frames is None:
        return [str(ds.SOPInstanceUID) for ds in sources]
    return [f"{sources[0].SOPInstanceUID}:{frame}" for frame in source_frames]


def _segment_descriptions(
    present: Sequence[LabelLike],
    *,
    source_series_uid: str,
    model_name: str,
    algorithm: hd.AlgorithmIdentificationSequence,
) -> list[hd.seg.SegmentDescription]:
    descriptions: list[hd.seg.SegmentDescription] = []
    for number, label in enumerate(present, start=1):
        r, g, b = (int(c) for c in label.color)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(label.name),
            segmented_property_category=_code(label.category),
            segmented_property_type=_code(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=_lo(label.name),
            tracking_uid=_derived_uid("tracking", source_series_uid, model_name, label.name),
            display_color=hd.color.CIELabColor.from_rgb(r, g, b),
        )
        # Keeps the model's own label id recoverable from the SEG alone.
        description.SegmentDescription = _lo(f"{label.name} (label {label.id})")
        if label.modifier is not None:
            # The modifier (e.g. laterality) belongs inside the property type item.
            description.SegmentedPropertyTypeCodeSequence[
                0
            ].SegmentedPropertyTypeModifierCodeSequence = [_code(label.modifier)]
        # Optional in the catalogue (a cyst lies in a kidney); read with getattr so simple
        # stand-ins without these fields still satisfy LabelLike.
        region: CodeLike | None = getattr(label, "anatomic_region", None)
        if region is not None:
            item = _code(region)
            region_modifier: CodeLike | None = getattr(label, "anatomic_region_modifier", None)
            if region_modifier is not None:
                item.AnatomicRegionModifierSequence = [_code(region_modifier)]
            description.AnatomicRegionSequence = [item]
        descriptions.append(description)
    return descriptions


def encode_seg(
    label_map: np.ndarray,
    source_images: Sequence[Dataset] | Dataset,
    catalogue: CatalogueLike,
    *,
    model_name: str,
    model_version: str,
    weights_sha256: str,
    format: SegFormat | str = SegFormat.BINARY,
    compression: SegCompression | str = SegCompression.NONE,
    content_creator: str = "dicom-node",
    series_number: int = 9901,
    workers: int = 0,
    source_frames: Sequence[int] | None = None,
    instance_number: int = 1,
    stack: str = "",
) -> hd.seg.Segmentation:
    """Encode ``label_map`` as a DICOM Segmentation referencing ``source_images``.

    Args:
        label_map: (z, y, x) unsigned integer array; voxel values are catalogue label ids, 0 is
            background. Plane ``z`` must correspond to ``source_images[z]`` (single-frame
            sources) or to frame ``z + 1`` of the one multi-frame source, pixel for pixel.
        source_images: the source series' datasets (headers suffice, pixel data is not read),
            sorted in the label map's slice order, or one multi-frame dataset.
        catalogue: gives each label's name, codes, optional modifier (laterality) and colour.
        model_name, model_version, weights_sha256: identify the algorithm; the SHA-256 of the
            weights goes into the Algorithm Version (first 16 digits) and Parameters (all 64).
        format: ``"binary"`` (default) or ``"labelmap"``.
        compression: ``"none"`` or ``"jpeg2000"`` for BINARY; ``"none"``, ``"rle"``,
            ``"jpegls"`` or ``"jpeg2000"`` for LABELMAP.
        content_creator: Content Creator Name (readers such as dcmqi warn without one).
        series_number: Series Number of the SEG series.
        workers: processes for frame compression (0: in this process; negative: one per
            core); has no effect with ``compression="none"``.
        source_frames: with one multi-frame source of which only some frames were segmented
            (one stack of several), the 1-based source frame of each plane of ``label_map``;
            the SEG then references those frames only.
        instance_number: Instance Number of the SEG (the worker gives the series version, so
            the SEG of more images of a series is told apart from the earlier one).
        stack: which stack of a series of several was segmented; goes into the Content
            Description, which tells the SEGs of two stacks of one series apart in a viewer.

    Returns:
        The Segmentation (a pydicom Dataset); only labels present in ``label_map`` are
        segments, numbered as ``segment_mapping`` returns. BINARY omits empty frames.

    Raises:
        EmptySegmentationError: ``label_map`` holds no label.
        ValueError: unsupported format/compression combination, shape mismatch with the
            sources, or label values the catalogue does not describe.
    """
    fmt = SegFormat(format)
    comp = SegCompression(compression)
    if comp not in ALLOWED_COMPRESSIONS[fmt]:
        allowed = ", ".join(c.value for c in ALLOWED_COMPRESSIONS[fmt])
        raise ValueError(
            f"compression {comp.value!r} is not supported with format {fmt.value!r}; "
            f"use one of: {allowed}"
        )
    digest = _check_sha256(weights_sha256)
    _check_label_map(label_map)
    sources, n_planes = _source_geometry(source_images)
    sources, source_text = _for_highdicom(sources)
    plane_positions = None
    if source_frames is not None:
        plane_positions = _plane_positions_of_frames(sources, source_frames)
        n_planes = len(source_frames)
    first = sources[0]
    if label_map.shape != (n_planes, int(first.Rows), int(first.Columns)):
        raise ValueError(
            f"label_map shape {label_map.shape} does not match the sources "
            f"({n_planes} planes of {int(first.Rows)}x{int(first.Columns)})"
        )
    if comp is SegCompression.JPEG2000 and min(label_map.shape[1:]) < _JPEG2000_MIN_SIDE:
        # The radiologist still gets a SEG.
        logger.warning(
            "series %s: its %dx%d images are too small for JPEG 2000; the SEG is uncompressed",
            first.SeriesInstanceUID,
            label_map.shape[1],
            label_map.shape[2],
        )
        comp = SegCompression.NONE

    labels = _labels_by_id(catalogue)
    counts = _voxel_counts(label_map)
    present_ids = _present_ids(counts, labels)
    present = [labels[i] for i in present_ids]

    # Remap catalogue ids to segment numbers 1..N, skipped when they already are (a model
    # whose every label was found).
    pixel_dtype = np.uint8 if len(present_ids) <= np.iinfo(np.uint8).max else np.uint16
    pixels: np.ndarray
    if present_ids == list(range(1, len(present_ids) + 1)):
        pixels = (
            label_map if label_map.dtype in (np.uint8, np.uint16) else label_map.astype(pixel_dtype)
        )
    else:
        lut = np.zeros(counts.size, dtype=pixel_dtype)
        lut[present_ids] = np.arange(1, len(present_ids) + 1, dtype=pixel_dtype)
        pixels = lut[label_map]

    source_series_uid = str(first.SeriesInstanceUID)
    series_uid, instance_uid = seg_uids(
        source_series_uid,
        model_name=model_name,
        weights_sha256=digest,
        format=fmt,
        source_instances=_segmented_instances(sources, source_frames),
        content=_content_digest(pixels, present, model_version),
    )
    version = f"{model_version} sha256:{digest[:16]}"
    if len(version) > _LO_MAX:
        raise ValueError(f"model_version {model_version!r} is too long for Algorithm Version")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(model_name),
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        source="dicom-node",
        parameters={"weights_sha256": digest},
    )
    descriptions = _segment_descriptions(
        present, source_series_uid=source_series_uid, model_name=model_name, algorithm=algorithm
    )

    logger.info(
        "encoding %s SEG (%s) of series %s: %d of %d labels present, model %s %s",
        fmt.value,
        comp.value,
        source_series_uid,
        len(present),
        len(labels),
        model_name,
        model_version,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.BINARY
            if fmt is SegFormat.BINARY
            else hd.seg.SegmentationTypeValues.LABELMAP
        ),
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer="dicom-node",
        manufacturer_model_name="dicom-node seg_encode",
        software_versions=__version__,
        device_serial_number="dicom-node",
        content_description=_lo(f"{model_name} {model_version}" + (f"; {stack}" if stack else "")),
        content_creator_name=_person_name(content_creator),
        content_label=_content_label(model_name),
        series_description=_seg_series_description(model_name, model_version, first),
        transfer_syntax_uid=_TRANSFER_SYNTAX[comp],
        omit_empty_frames=True,
        workers=workers if comp is not SegCompression.NONE else 0,
        plane_positions=plane_positions,
    )
    restore_source_text(seg, first, source_text)
    if source_frames is not None:
        _reference_only(seg, set(source_frames))
    logger.info(
        "encoded SEG %s: %d segments, %d frames", instance_uid, len(present), seg.NumberOfFrames
    )
    return seg
