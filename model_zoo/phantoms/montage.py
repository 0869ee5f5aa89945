"""Labelled montage of example phantom slices in a bone window (for docs and visual QA).

Each example is shown twice: the whole slice with a box around the finding, and
a zoomed crop of the finding. Matplotlib with the Agg backend (no display).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .generator import HARD_NEGATIVE_KINDS, PhantomStudy, render_study, sample_study_spec

BONE_WINDOW = (500.0, 1800.0)  # level, width
CROP_MM = 90.0
EXAMPLE_KINDS = ("positive", "negative", *HARD_NEGATIVE_KINDS)
MIN_EXAMPLE_LESION_MM = 8.0  # the positive example should show a clearly visible lesion


@dataclass(frozen=True)
class Panel:
    """One example slice: HU image, pixel spacing and the pixel (row, col) to zoom on."""

    kind: str  # "positive", "negative" or a hard-negative kind
    title: str
    hu: np.ndarray  # (rows, cols)
    spacing_mm: float
    focus_rc: tuple[int, int]


def window(hu: np.ndarray, level: float = BONE_WINDOW[0], width: float = BONE_WINDOW[1]) -> np.ndarray:
    """HU -> display values in [0, 1] for the window (level, width)."""
    return np.clip((np.asarray(hu, dtype=np.float32) - (level - width / 2.0)) / width, 0.0, 1.0)


def _pixel(study: PhantomStudy, x: float, y: float) -> tuple[int, int]:
    x0, y0 = study.origin_xy_mm
    return int(round((y - y0) / study.pixel_spacing_mm)), int(round((x - x0) / study.pixel_spacing_mm))


def _nearest_slice(study: PhantomStudy, z: float) -> int:
    return int(np.argmin(np.abs(study.z_mm - z)))


def _spine_view(study: PhantomStudy) -> tuple[int, tuple[int, int]]:
    """The slice through the middle of a vertebral body (or the middle slice) and where the spine is."""
    spec = study.spec
    bodies = [v for v in spec.anatomy.vertebrae if study.z_mm[0] <= v.z_mid <= study.z_mm[-1]]
    if bodies:
        v = bodies[len(bodies) // 2]
        return _nearest_slice(study, v.z_mid), _pixel(study, 0.0, v.y_center + v.half_depth)
    k = len(study.z_mm) // 2
    rows, cols = np.nonzero(study.bone_mask[k])
    return k, ((int(np.median(rows)), int(np.median(cols))) if len(rows) else (study.hu.shape[1] // 2,) * 2)


def panels_from_study(study: PhantomStudy, wanted: set[str]) -> list[Panel]:
    """Example panels this study can show, for the wanted kinds ("positive", "negative", hard negatives)."""
    spec = study.spec
    sc = spec.scanner
    setting = f"{sc.kernel} {sc.slice_thickness_mm:g} mm, noise {sc.noise_sigma_hu:.0f} HU"
    panels = []
    # The classic picture: a clearly visible lesion, in a vertebral body if there is one.
    visible = [les for les in spec.lesions if les.diameter_mm >= MIN_EXAMPLE_LESION_MM]
    if "positive" in wanted and visible:
        lesion = max(visible, key=lambda les: (les.bone == "vertebra", les.diameter_mm))
        k = _nearest_slice(study, lesion.center_mm[2])
        title = f"positive: {lesion.diameter_mm:.0f} mm lytic lesion, {lesion.bone}\n{setting}"
        panels.append(
            Panel(
                "positive", title, study.hu[k], study.pixel_spacing_mm, _pixel(study, *lesion.center_mm[:2])
            )
        )
    if "negative" in wanted and not spec.positive:
        k, focus = _spine_view(study)
        panels.append(Panel("negative", f"negative\n{setting}", study.hu[k], study.pixel_spacing_mm, focus))
    for hn in spec.hard_negatives:
        if hn.kind not in wanted or any(p.kind == hn.kind for p in panels):
            continue
        if hn.center_mm is None:  # osteoporosis: show a vertebral body
            if not any(study.z_mm[0] <= v.z_mid <= study.z_mm[-1] for v in spec.anatomy.vertebrae):
                continue
            k, focus = _spine_view(study)
            title = f"osteoporosis (trabecular {spec.anatomy.trabecular_hu:.0f} HU)\n{setting}"
        else:
            k = _nearest_slice(study, hn.center_mm[2])
            focus = _pixel(study, hn.center_mm[0], hn.center_mm[1])
            title = f"{hn.kind.replace('_', ' ')} ({hn.size_mm:.0f} mm)\n{setting}"
        panels.append(Panel(hn.kind, title, study.hu[k], study.pixel_spacing_mm, focus))
    return panels


def example_panels(seed: int, panels: list[Panel] = (), n_slices: int = 8) -> list[Panel]:
    """One panel per kind of EXAMPLE_KINDS: the given panels first, extra studies for missing kinds."""
    found: dict[str, Panel] = {}
    for panel in panels:
        found.setdefault(panel.kind, panel)
    index = 100_000  # far from the indices of any data set's own studies
    while len(found) < len(EXAMPLE_KINDS) and index < 100_400:
        spec = sample_study_spec(seed, index, positive=index % 2 == 0, n_slices=n_slices)
        shows = {h.kind for h in spec.hard_negatives} | {"positive" if spec.positive else "negative"}
        if shows - set(found):
            for panel in panels_from_study(render_study(spec), set(EXAMPLE_KINDS) - set(found)):
                found.setdefault(panel.kind, panel)
        index += 1
    return [found[k] for k in EXAMPLE_KINDS if k in found]


def save_montage(panels: list[Panel], path: Path, dpi: int = 100) -> Path:
    """Write the montage PNG: full slices (top row) and zoomed crops (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False, facecolor="black")
    for j, panel in enumerate(panels):
        image = window(panel.hu)
        half = int(round(CROP_MM / 2.0 / panel.spacing_mm))
        r, c = panel.focus_rc
        r0, c0 = max(r - half, 0), max(c - half, 0)
        top, bottom = axes[0, j], axes[1, j]
        top.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
        top.add_patch(Rectangle((c0, r0), 2 * half, 2 * half, fill=False, edgecolor="yellow", linewidth=0.8))
        top.set_title(panel.title, color="white", fontsize=7)
        bottom.imshow(
            image[r0 : r + half, c0 : c + half], cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos"
        )
        bottom.set_title(f"zoom {CROP_MM:.0f} mm", color="white", fontsize=7)
        for ax in (top, bottom):
            ax.set_axis_off()
    fig.suptitle("Synthetic CT phantoms, bone window W 1800 / L 500", color="white", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, facecolor="black")
    plt.close(fig)
    return path
