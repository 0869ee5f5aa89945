"""Pictures of a result: windowed slices with the heatmap overlay and the findings marked.

Shared by the Streamlit slice viewer, the key-image thumbnails and the PNG/PDF
summary. The overlay itself is ``app.results_dicom.overlay_rgb``, the one the DICOM
key images use, so every picture of a result looks the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from app.domain import Finding, StudyResult
from app.results_dicom import BONE_WINDOW, overlay_rgb

Window = tuple[float, float]  # (level, width) in HU, as app.results_dicom.overlay_rgb takes it
# Display presets offered by the viewer; bone first because lytic lesions are read there.
WINDOWS: dict[str, Window] = {
    f"Bone (L {BONE_WINDOW[0]:g} / W {BONE_WINDOW[1]:g})": BONE_WINDOW,
    "Soft tissue (L 40 / W 400)": (40.0, 400.0),
    "Lung (L -600 / W 1500)": (-600.0, 1500.0),
}
FINDING_COLOUR = (0, 200, 255)  # cyan: distinct from the black-red-yellow heat colours
BOX_MARGIN_PX = 4


@dataclass(frozen=True)
class FindingMark:
    """A finding drawn on one slice: its number (1-based, as listed) and box in original pixels."""

    number: int
    bbox_px: tuple[int, int, int, int]  # (row0, col0, row1, col1), inclusive
    is_peak: bool


def marks_on_slice(findings: list[Finding], index: int) -> list[FindingMark]:
    """Findings whose slice range covers ``index``; the box is the one located on the peak slice."""
    return [FindingMark(number, f.bbox_px, index == f.peak_slice)
            for number, f in enumerate(findings, start=1) if f.slice_start <= index <= f.slice_end]


def render_slice(slice_hu: np.ndarray, heatmap: np.ndarray | None, window: Window = BONE_WINDOW,
                 marks: list[FindingMark] = ()) -> Image.Image:
    """One slice in ``window``, the heatmap blended on top when given, findings boxed and numbered."""
    image = Image.fromarray(overlay_rgb(slice_hu, heatmap, window))
    if marks:
        draw = ImageDraw.Draw(image)
        width = max(1, round(max(image.size) / 256))
        font = ImageFont.load_default(size=max(10, max(image.size) // 32))
        for mark in marks:
            r0, c0, r1, c1 = mark.bbox_px
            box = (c0 - BOX_MARGIN_PX, r0 - BOX_MARGIN_PX, c1 + BOX_MARGIN_PX, r1 + BOX_MARGIN_PX)
            # Thick on the slice the box was located on, thin on the rest of the run.
            draw.rectangle(box, outline=FINDING_COLOUR, width=width if mark.is_peak else max(1, width // 2))
            draw.text((box[0], box[1] - 2), f"F{mark.number}", fill=FINDING_COLOUR, font=font, anchor="lb")
    return image


def key_image(slice_hu: np.ndarray, result: StudyResult, index: int, window: Window = BONE_WINDOW) -> Image.Image:
    """The key image of slice ``index``: bone window, heatmap (if computed there) and findings."""
    return render_slice(slice_hu, result.heatmaps.get(index), window, marks_on_slice(result.findings, index))


def thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    small = image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return small
