"""Peak memory and time of one segmentation job on a large series, stage by stage (CPU).

Writes a CT-like (512 x 512 slices, 0.8 mm pixels, 1 mm apart, rescale intercept -1024) or
MR-like (448 x 448, 1 mm, 2 mm apart) series of the demo phantom (``inference.demo.phantoms``)
into a temporary folder, axial or as a sagittal/coronal stack, then runs the worker's stages
on it in a fresh child process, as ``segment_volume`` runs them, with the built-in demo model:

* ``load``: ``volume_from_series`` (headers, sort, pixels -> float32 volume);
* ``reorient``: the turn to the model's axes (a copy for a non-axial series);
* ``predict``: ``Segmenter.predict`` (nnU-Net: preprocess, resample to 3 x 2 x 2 mm, sliding
  window, resample the class logits back to the source grid, argmax);
* ``invert``: the label map turned back to the source grid;
* ``encode``: label volumes and ``encode_seg`` (BINARY, uncompressed: the default);
* ``write``: ``seg_to_bytes`` to a file.

Printed per stage: seconds, the peak resident memory during the stage (psutil sampled every
10 ms) and the resident memory at its end; then the process's ``ru_maxrss`` and the size of
one float32 volume, to read the peaks as volume copies. There is no peer to compare with here
(TotalSegmentator's SEG writer and pipeline are not installed): the figures are absolute.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/job_memory.py --slices 200
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/job_memory.py --slices 200 --orientation sagittal
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/job_memory.py --slices 400 --modality MR

``--keep DIR`` writes the series into DIR and keeps it (a later run with the same arguments and
``--keep DIR`` reuses it); ``--threads`` sets torch's threads (default 1, the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Row and column direction cosines (LPS) of each stack, as HFS scanners write them.
_COSINES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
_GEOMETRY = {  # rows = columns, pixel spacing, slice step (mm)
    "CT": (512, 0.8, 1.0),
    "MR": (448, 1.0, 2.0),
}


def write_series(folder: Path, slices: int, modality: str, orientation: str) -> list[Path]:
    """One file per slice, each sampled on its own (a 1000-slice grid never exists whole)."""
    from inference.demo.phantoms import PhantomSpec, sample_phantom

    folder.mkdir(parents=True, exist_ok=True)
    size, pixel, step = _GEOMETRY[modality]
    row, col = (np.array(v) for v in _COSINES[orientation])
    normal = np.cross(row, col)
    # The phantom's organs lie near the origin; centre the grid on it.
    first = -(size - 1) / 2 * pixel * (row + col) - (slices - 1) / 2 * step * normal
    spec = PhantomSpec.from_seed(3)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    j, i = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    in_plane = (i.reshape(-1, 1) * row + j.reshape(-1, 1) * col) * pixel
    paths = []
    for z in range(slices):
        position = first + z * step * normal
        intensity, _ = sample_phantom(spec, in_plane + position)
        stored = np.clip(np.rint(intensity) + (1024 if modality == "CT" else 0), 0, 65535)
        ds = Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240517"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber, ds.Modality, ds.Manufacturer = "ACC-BENCH", modality, "benchmark"
        ds.ReferringPhysicianName = ""
        ds.PatientName, ds.PatientID = "Bench^Job", "BENCH-1"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDescription, ds.SeriesDescription = "benchmark", f"{orientation} {slices}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 3, z + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if orientation == "axial" else "OTHER"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [pixel, pixel]
        ds.SliceThickness = step
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.KVP = 120
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
            ds.MRAcquisitionType = "3D"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = stored.astype(np.uint16).tobytes()
        path = folder / f"IM{z + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class _Peaks:
    """Resident memory sampled every 10 ms; the peak since the last ``stage``."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _job(folder: Path, out: Path) -> None:
    """The worker's stages on ``folder``, each timed and its peak memory printed."""
    import torch

    from dicom_node.seg_encode import encode_seg, label_volumes_ml
    from dicom_node.seg_write import seg_to_bytes
    from dicom_node.volume import closest_canonical_reorientation, volume_from_series
    from inference.model_store import BUILTIN_MODELS, load_model_info
    from inference.predictor import Segmenter

    torch.set_num_threads(int(os.environ.get("JOB_MEMORY_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    info = load_model_info("demo", BUILTIN_MODELS["demo"].parent)
    segmenter = Segmenter(info, device="cpu")
    paths = sorted(folder.glob("*.dcm"))
    peaks = _Peaks()
    rows: list[tuple[str, float, int, int, int]] = []
    baseline = peaks.rss()

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        start = peaks.peak = peaks.rss()
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        rows.append((name, seconds, start, max(peaks.peak, peaks.rss()), peaks.rss()))

    with stage("load"):
        volume = volume_from_series(paths)
    orientation = str(info.descriptor.orientation)
    with stage("reorient"):
        turn = closest_canonical_reorientation(volume.affine, volume.array.shape, orientation)
        data = turn.apply(volume.array)
        affine = volume.affine @ turn.transform()
        volume_bytes = volume.array.nbytes
        if data is not volume.array:  # as segment_series: the series' own array goes
            volume.array = np.empty((0, 0, 0), dtype=volume.array.dtype)
    z, y, x = (float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)[::-1])
    with stage("predict"):
        predicted = segmenter.predict(data, (z, y, x))
    del data  # segment.py's _segment_in drops it here too (its local goes out of scope)
    with stage("invert"):
        label_map = turn.invert(predicted)
    del predicted
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.source_datasets}
    sources = [by_uid[ref.sop_instance_uid] for ref in volume.frames]
    spacing = volume.spacing_zyx
    with stage("encode"):
        volumes = label_volumes_ml(label_map, spacing[0] * spacing[1] * spacing[2], info.catalogue)
        seg = encode_seg(
            label_map,
            sources,
            info.catalogue,
            model_name=info.name,
            model_version=info.descriptor.version,
            weights_sha256=info.weights_sha256,
        )
    with stage("write"):
        target = out / "seg.dcm"
        target.write_bytes(seg_to_bytes(seg))
    peaks.close()

    mib = 1 << 20
    volume_mib = volume_bytes / mib
    print(f"volume {label_map.shape} (z, y, x); one float32 copy = {volume_mib:.0f} MiB")
    print(f"rss after model load: {baseline / mib:.0f} MiB")
    # "rise": the stage's peak above its start, in float32 volumes (its own temporaries).
    print(
        f"{'stage':<9} {'seconds':>8} {'start MiB':>10} {'peak MiB':>9} {'end MiB':>8} {'rise':>7}"
    )
    for name, seconds, start, peak, end in rows:
        rise = (peak - start) / mib / volume_mib
        print(
            f"{name:<9} {seconds:8.2f} {start / mib:10.0f} {peak / mib:9.0f} {end / mib:8.0f}"
            f" {rise:6.2f}v"
        )
    total = sum(r[1] for r in rows)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"total {total:.2f} s; ru_maxrss {maxrss / mib:.0f} MiB "
        f"({(maxrss - baseline) / mib / volume_mib:.2f} float32 volumes above the model)"
    )
    found = ", ".join(f"{n} {ml:.0f} ml" for _, n, ml in volumes if ml)
    print(
        f"labels: {found or 'none'}; SEG {target.stat().st_size / mib:.1f} MiB, "
        f"{int(seg.NumberOfFrames)} frames"
    )
    print("peer: none here (TotalSegmentator is not installed): absolute figures only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--modality", choices=sorted(_GEOMETRY), default="CT")
    parser.add_argument("--orientation", choices=sorted(_COSINES), default="axial")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="folder to write the series into and keep")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.job is not None:
        with tempfile.TemporaryDirectory(prefix="job_memory_out_") as out:
            _job(args.job, Path(out))
        return
    with tempfile.TemporaryDirectory(prefix="job_memory_") as tmp:
        folder = args.keep or Path(tmp) / "series"
        if not any(folder.glob("*.dcm")):
            started = time.perf_counter()
            write_series(folder, args.slices, args.modality, args.orientation)
            print(
                f"wrote {args.slices} {args.orientation} {args.modality} slices to {folder} "
                f"in {time.perf_counter() - started:.0f} s"
            )
        # A fresh process: its peak memory is the job's alone, not the series writer's.
        env = {**os.environ, "JOB_MEMORY_THREADS": str(args.threads)}
        subprocess.run([sys.executable, __file__, "--job", str(folder)], check=True, env=env)


if __name__ == "__main__":
    main()
