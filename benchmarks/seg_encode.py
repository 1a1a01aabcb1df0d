"""DICOM-SEG encoding: dicom_node.seg_encode against TotalSegmentator's own writer, same masks.

Two cases, each with a blobby synthetic label map (ellipsoid "organs" inside an ellipsoid body,
left/right pairs, a few small structures) and a matching single-frame source series written to a
temporary folder:

* VIBE-like MR: 71 labels on 320 x 260 x 300 (x, y, z);
* CT-like: 117 labels on 512 x 512 x 300.

Timed, end to end to a file on disk:
* TotalSegmentator ``save_mask_as_dicomseg`` (reads the DICOM folder itself, BINARY);
* ours BINARY and LABELMAP (RLE and JPEG-LS) from headers already in memory (what the node has
  after building the volume), written with ``seg_to_bytes`` as the node does; BINARY including
  the header read from the same folder (the row whose input is TotalSegmentator's: the folder);
  BINARY written with pydicom's ``save_as`` instead.

The three SEGs written last (TotalSegmentator's, ours BINARY, ours LABELMAP RLE) must decode to
the same voxels, else the run stops before printing ratios. The output's first line names the
TotalSegmentator version and the file its writer came from (a stand-in without the package's
metadata says so).

Run: ``.venv/bin/python benchmarks/seg_encode.py [--repeat 3] [--ts-repeat 1] [--case vibe|ct]``
(medians; TotalSegmentator's writer takes about a minute per CT run, hence its own count).
TotalSegmentator is not one of the node's dependencies. Install its package and the one
module its writer needs outside the venv, so that its own dependencies (vtk, dipy, python-gdcm,
...) stay out of the node's environment, and put them on the path:

    .venv/bin/pip install --no-deps --target /tmp/ts TotalSegmentator dicom2nifti
    PYTHONPATH=/tmp/ts .venv/bin/python benchmarks/seg_encode.py --case ct
Targets: our BINARY <= 0.5x TotalSegmentator's time; LABELMAP <= 2 s and <= 5 MB (CT case).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.seg_encode import encode_seg
from dicom_node.seg_write import seg_to_bytes
from inference.catalogue import Catalogue, load_catalogue

WEIGHTS_SHA256 = "5e" * 32


@dataclass
class Case:
    name: str
    catalogue: str
    modality: str
    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm


CASES = {
    "vibe": Case("VIBE-like MR", "vibe", "MR", (300, 260, 320), (1.5, 1.4, 1.4)),
    "ct": Case("CT-like", "total", "CT", (300, 512, 512), (1.5, 0.8, 0.8)),
}


def blobby_label_map(shape: tuple[int, int, int], ids: list[int], seed: int = 1) -> np.ndarray:
    """Ellipsoid organs of varied size packed inside an ellipsoid body; later ones win overlaps."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    label_map = np.zeros(shape, dtype=np.uint8)
    body_c = np.array([nz / 2, ny / 2, nx / 2])
    body_r = np.array([nz * 0.48, ny * 0.42, nx * 0.45])
    for k, label_id in enumerate(ids):
        # A few big organs, many medium (muscles, bones), some small (glands, vessels).
        scale = (0.28, 0.15, 0.08)[0 if k < 6 else (1 if k < len(ids) * 0.7 else 2)]
        radii = np.maximum(rng.uniform(0.5, 1.0, 3) * scale * np.array(shape), 2.0)
        radii[0] *= rng.uniform(1.0, 2.0)  # organs are longer head-to-foot
        centre = body_c + rng.uniform(-0.6, 0.6, 3) * (body_r - radii).clip(min=1.0)
        lo = np.maximum(0, np.floor(centre - radii)).astype(int)
        hi = np.minimum(shape, np.ceil(centre + radii) + 1).astype(int)
        z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        # A wobbly surface so frames are not perfect ellipses.
        wobble = 1.0 + 0.15 * np.sin(z * 0.3 + k) * np.cos(x * 0.2 - k)
        inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
            (x - centre[2]) / radii[2]
        ) ** 2 <= wobble
        label_map[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][inside] = label_id
    return label_map


def write_source_series(case: Case, folder: Path) -> list[Dataset]:
    """A single-frame series of the case's geometry; returns the headers (no pixel data)."""
    nz, ny, nx = case.shape
    sz, sy, sx = case.spacing
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    pixels = np.zeros((ny, nx), dtype=np.int16).tobytes()
    sop_class = MRImageStorage if case.modality == "MR" else CTImageStorage
    headers = []
    for z in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = datetime.date(2024, 1, 2).strftime("%Y%m%d")
        ds.StudyTime = "101010"
        ds.AccessionNumber = "A1"
        ds.Modality = case.modality
        ds.ReferringPhysicianName = ""
        ds.PatientName = "Bench^Mark"
        ds.PatientID = "BENCH"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = z + 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImagePositionPatient = [-nx * sx / 2, -ny * sy / 2, z * sz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels
        ds.save_as(folder / f"{z:04d}.dcm", enforce_file_format=True)
        del ds.PixelData
        headers.append(ds)
    return headers


def timed(fn: Callable[[], Path], repeat: int) -> tuple[float, int]:
    """Median seconds over ``repeat`` runs and the size of the file the last run wrote."""
    times = []
    path = Path()
    for _ in range(repeat):
        start = time.perf_counter()
        path = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), path.stat().st_size


def run_case(
    case: Case, repeat: int, ts_repeat: int, workdir: Path
) -> list[tuple[str, float, int]]:
    catalogue: Catalogue = load_catalogue(case.catalogue)
    ids = [label.id for label in catalogue.labels]
    start = time.perf_counter()
    label_map = blobby_label_map(case.shape, ids)
    present = np.count_nonzero(np.bincount(label_map.ravel(), minlength=max(ids) + 1)[1:])
    src_dir = workdir / f"src-{case.catalogue}"
    src_dir.mkdir()
    headers = write_source_series(case, src_dir)
    print(
        f"\n{case.name}: {len(ids)} labels ({present} present) on {case.shape[::-1]} (x, y, z); "
        f"setup {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    from totalsegmentator.dicom_io import save_mask_as_dicomseg

    # TotalSegmentator takes the mask in NIfTI (x, y, z) order with rows flipped for an axial
    # series whose column cosine points posterior; this undoes exactly what it does inside.
    ts_mask = np.ascontiguousarray(label_map[:, ::-1, :].transpose(2, 1, 0))
    classes = {label.id: label.name for label in catalogue.labels}
    out = workdir / f"out-{case.catalogue}"
    out.mkdir()

    def totalsegmentator() -> Path:
        path = out / "ts.dcm"
        # Its tqdm progress bar and prints are not part of the work measured.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            save_mask_as_dicomseg(ts_mask, classes, src_dir, path, np.eye(4))
        return path

    def ours(
        fmt: str, comp: str, *, read_headers: bool = False, save_as: bool = False
    ) -> Callable[[], Path]:
        def run() -> Path:
            sources = headers
            if read_headers:
                files = sorted(src_dir.glob("*.dcm"))
                sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            seg = encode_seg(
                label_map,
                sources,
                catalogue,
                model_name=case.catalogue,
                model_version="1.0",
                weights_sha256=WEIGHTS_SHA256,
                format=fmt,
                compression=comp,
            )
            path = out / f"ours-{fmt}-{comp}{'-save_as' if save_as else ''}.dcm"
            if save_as:  # pydicom's own writer, for comparison
                seg.save_as(path, enforce_file_format=True)
            else:
                path.write_bytes(seg_to_bytes(seg))  # what the node writes
            return path

        return run

    rows = [
        ("TotalSegmentator BINARY", *timed(totalsegmentator, ts_repeat)),
        ("ours BINARY", *timed(ours("binary", "none"), repeat)),
        ("ours BINARY, pydicom save_as", *timed(ours("binary", "none", save_as=True), repeat)),
        ("ours BINARY + header read", *timed(ours("binary", "none", read_headers=True), repeat)),
        ("ours LABELMAP RLE", *timed(ours("labelmap", "rle"), repeat)),
        ("ours LABELMAP JPEG-LS", *timed(ours("labelmap", "jpegls"), repeat)),
    ]
    check_same_content(out / "ts.dcm", out / "ours-binary-none.dcm", out / "ours-labelmap-rle.dcm")
    return rows


def check_same_content(ts_path: Path, binary_path: Path, labelmap_path: Path) -> None:
    """All three files hold the same voxels (guards the orientation handling above), else exit:
    times of files that differ are no comparison. Voxel by voxel, as counts per segment would
    not see a flipped or transposed mask."""
    import highdicom as hd

    first: np.ndarray | None = None
    for path in (ts_path, binary_path, labelmap_path):
        seg = hd.seg.segread(path)
        uids = [uid for _, _, uid in seg.get_source_image_uids()]
        # Segments relabelled 1..N in segment-number order: both writers number the labels
        # present in ascending label order.
        array = seg.get_pixels_by_source_instance(
            sorted(uids), combine_segments=True, relabel=True, assert_missing_frames_are_empty=True
        )
        if first is None:
            first = array
        elif array.shape != first.shape or not np.array_equal(array, first):
            differ = int(np.count_nonzero(array != first)) if array.shape == first.shape else -1
            raise SystemExit(
                f"{path.name} decodes to other voxels than {ts_path.name} ("
                + (f"{differ} differ" if differ >= 0 else f"shape {array.shape} vs {first.shape}")
                + "): no ratios printed"
            )
    print("decoded voxels agree across the three files")


def print_table(case: Case, rows: list[tuple[str, float, int]]) -> None:
    ts_time, ts_size = rows[0][1], rows[0][2]
    print(f"| {case.name} | time s | x TS time | size MB | x TS size |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds, size in rows:
        print(
            f"| {name} | {seconds:.2f} | {seconds / ts_time:.2f} | {size / 1e6:.2f} | "
            f"{size / ts_size:.3f} |"
        )


def _check_peer() -> str:
    """Which TotalSegmentator writer runs, for the output: a stand-in on the path would
    otherwise pass for it."""
    try:
        import totalsegmentator.dicom_io as dicom_io
    except ImportError as exc:
        raise SystemExit(
            f"TotalSegmentator's SEG writer cannot be imported ({exc}): install it as this "
            "script's docstring says (pip install --no-deps --target /tmp/ts TotalSegmentator "
            "dicom2nifti; PYTHONPATH=/tmp/ts)"
        ) from exc
    try:
        version = importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        version = "NOT AN INSTALLED PACKAGE (no TotalSegmentator metadata)"
    return f"TotalSegmentator {version}, save_mask_as_dicomseg from {dicom_io.__file__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each of ours (median)")
    parser.add_argument("--ts-repeat", type=int, default=1, help="runs of TotalSegmentator's")
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    args = parser.parse_args()
    peer = _check_peer()  # before minutes of set-up
    print(f"peer: {peer}", flush=True)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        for key in args.case or ["vibe", "ct"]:
            case = CASES[key]
            rows = run_case(case, args.repeat, args.ts_repeat, Path(tmp))
            print_table(case, rows)


if __name__ == "__main__":
    main()
