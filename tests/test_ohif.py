"""The SEG the node returns to the PACS, shown by the real OHIF viewer in a real browser.

Orthanc pushes a phantom series to the node, the demo model segments it and the node
C-STOREs the SEG back to Orthanc. OHIF 3.13 (npm ``@ohif/app``, cached in ``tests/.cache``)
is then served beside a proxy to Orthanc's DICOMweb (``tests/ohif_server.py``) and opened in
headless Debian chromium, driven by playwright. The segmentation panel must list the SEG's
labels, and the labelmap OHIF holds in memory must have, per segment, exactly the voxel
counts highdicom decodes from the SEG.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from e2e import (
    SEG_TIMEOUT_S,
    STRUCTURES,
    fetch,
    phantom_series,
    seg_instances,
    upload_series,
)
from ohif_server import OhifServer, ohif_dist
from peers import NodeProcess, Orthanc, PeerUnavailable, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.peers]

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # the browser fixture skips the test

    class PlaywrightError(Exception):  # type: ignore[no-redef]
        pass


CHROMIUM = "/usr/bin/chromium"
# Flags seen working here (../shared/PEERS.md, "OHIF, the clinical web viewer").
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-unsafe-swiftshader",
]
BROWSER_TIMEOUT_S = 90.0

# Per segmentation OHIF holds: segment index -> label, and segment index -> labelled voxels,
# counted over the labelmap images (stack labelmaps) or volume that cornerstone has cached.
# ``labelmaps`` (several layers when segments overlap) map stored values to segment indices.
OHIF_SEGMENTATIONS_JS = """() => {
  const service = window.services && window.services.segmentationService;
  const cs = window.cornerstone;
  if (!service || !cs) return null;
  return service.getSegmentations().map((seg) => {
    const labels = {};
    for (const [index, segment] of Object.entries(seg.segments || {})) {
      if (segment) labels[index] = segment.label;
    }
    const counts = {};
    let missing = 0;
    const labelmap = seg.representationData && seg.representationData.Labelmap;
    if (labelmap) {
      const layers = labelmap.labelmaps ? Object.values(labelmap.labelmaps) : [labelmap];
      for (const layer of layers) {
        const toSegment = layer.labelToSegmentIndex || {};
        const arrays = [];
        if (layer.imageIds && layer.imageIds.length) {
          for (const imageId of layer.imageIds) {
            const image = cs.cache.getImage(imageId);
            if (!image) { missing += 1; continue; }
            arrays.push(image.voxelManager ? image.voxelManager.getScalarData()
                                           : image.getPixelData());
          }
        } else if (layer.volumeId) {
          const volume = cs.cache.getVolume(layer.volumeId);
          if (!volume) { missing += 1; }
          else arrays.push(volume.voxelManager.getCompleteScalarDataArray());
        } else {
          missing += 1;
        }
        for (const data of arrays) {
          for (let i = 0; i < data.length; i++) {
            const value = data[i];
            if (value) {
              const index = toSegment[value] ?? value;
              counts[index] = (counts[index] || 0) + 1;
            }
          }
        }
      }
    }
    return { id: seg.segmentationId, label: seg.label, labels, counts, missing };
  });
}"""


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ohif() -> Path:
    """OHIF's dist folder with our app-config.js (npm pack once, then from the cache)."""
    try:
        return ohif_dist()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """A playwright page in headless Debian chromium with a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(BROWSER_TIMEOUT_S * 1000)
            yield page
        finally:
            context.close()


# -- helpers -----------------------------------------------------------------------------------


def seg_voxel_counts(seg_path: Path) -> dict[str, int]:
    """Segment label -> voxels in that segment, decoded by highdicom over all source images."""
    seg = hd.seg.segread(seg_path)
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    numbers = [n for n in seg.get_segment_numbers() if n != 0]  # LABELMAP: 0 is background
    sources = [sop for _study, _series, sop in seg.get_source_image_uids()]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, segment_numbers=numbers, combine_segments=False
    )
    per_segment = np.count_nonzero(pixels, axis=(0, 1, 2))
    return {labels[n]: int(count) for n, count in zip(numbers, per_segment, strict=True)}


def wait_for_seg(orthanc: Orthanc, node: NodeProcess) -> str:
    """The Orthanc id of the SEG the node delivered; fails at once if the job failed."""

    def arrived() -> str | None:
        failed = node.query("SELECT id, reason FROM jobs WHERE state = 'failed'")
        if failed:
            pytest.fail(f"job {failed[0]['id']} failed: {failed[0]['reason']}")
        if not node.running():
            pytest.fail(f"the node died:\n{node.log_text()[-4000:]}")
        found = seg_instances(orthanc)
        return found[0] if found else None

    return wait_until(arrived, timeout_s=SEG_TIMEOUT_S, interval_s=0.5, what="a SEG in Orthanc")


def click_if_visible(locator: Any) -> bool:
    """Click ``locator`` when it is on screen now; it may vanish between check and click."""
    if not locator.is_visible():
        return False
    with contextlib.suppress(PlaywrightError):
        locator.click(timeout=5000)
        return True
    return False


def load_seg_in_ohif(page: Any, url: str, study_uid: str) -> list[dict[str, Any]]:
    """Open the study, dismiss the tour, double-click the SEG thumbnail, answer Yes; return
    what :data:`OHIF_SEGMENTATIONS_JS` reads once a segmentation with segments is loaded."""
    page.goto(f"{url}/viewer?StudyInstanceUIDs={study_uid}")
    skip_tour = page.get_by_text("Skip all", exact=True)
    banner = page.locator('[data-cy="confirm-and-hide-button"]')  # "investigational use only"
    seg_thumbnail = page.locator('[data-cy="study-browser-thumbnail-no-image"]').filter(
        has=page.locator('[data-cy="series-modality-label"]', has_text="SEG")
    )
    tour_overlay = page.locator(".shepherd-modal-is-visible")  # swallows clicks while shown
    yes = page.get_by_role("button", name="Yes", exact=True)
    opened = False

    def step() -> list[dict[str, Any]] | None:
        nonlocal opened
        click_if_visible(skip_tour)
        if tour_overlay.count():
            return None
        click_if_visible(banner)
        if not opened and seg_thumbnail.count() == 1 and seg_thumbnail.is_visible():
            with contextlib.suppress(PlaywrightError):
                seg_thumbnail.dblclick(timeout=5000)
                opened = True
        click_if_visible(yes)
        loaded = page.evaluate(OHIF_SEGMENTATIONS_JS) if opened else None
        if loaded and all(s["labels"] and s["counts"] and not s["missing"] for s in loaded):
            return list(loaded)
        return None

    return wait_until(
        step, timeout_s=BROWSER_TIMEOUT_S, interval_s=0.25, what="OHIF to load the SEG"
    )


def open_segmentation_panel(page: Any, labels: list[str]) -> None:
    """Open the right-hand segmentation panel (once) and wait until it lists ``labels``."""
    button = page.locator('[data-cy="panelSegmentation-btn"]')
    clicked = False

    def listed() -> bool:
        nonlocal clicked
        if all(page.get_by_text(label, exact=True).first.is_visible() for label in labels):
            return True
        if not clicked and button.is_visible():
            button.click()
            clicked = True
        return False

    wait_until(listed, timeout_s=30, interval_s=0.25, what=f"the segmentation panel {labels}")


# -- the test ----------------------------------------------------------------------------------


def test_ohif_shows_the_seg_the_node_returned(
    pacs_and_node: tuple[Orthanc, NodeProcess], ohif: Path, browser_page: Any, tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    series = phantom_series(tmp_path / "series", seed=7101)
    orthanc.store_to_modality("NODE", [upload_series(orthanc, series)])
    seg_path = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg.dcm")
    expected = seg_voxel_counts(seg_path)
    assert sorted(expected) == sorted(STRUCTURES), expected
    assert all(count > 0 for count in expected.values()), expected

    page = browser_page
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    with OhifServer(ohif, orthanc.url) as server:
        try:
            loaded = load_seg_in_ohif(page, server.url, series.uids.study_instance_uid)
            open_segmentation_panel(page, sorted(expected))
            (segmentation,) = loaded
            shown = {
                label: int(segmentation["counts"].get(index, 0))
                for index, label in segmentation["labels"].items()
                if label != "Background"
            }
            assert shown == expected, (shown, expected)
            page.screenshot(path=tmp_path / "ohif.png")
        except BaseException:
            page.screenshot(path=tmp_path / "ohif-failure.png")
            print(f"screenshot: {tmp_path / 'ohif-failure.png'}")
            print("proxied errors:", *server.errors[-20:], sep="\n  ")
            print("browser console:", *console[-40:], sep="\n  ")
            raise
