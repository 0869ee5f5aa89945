"""A one-page summary of a result (PDF or PNG): call, probability, slice chart, key images, model.

Built with matplotlib's object API (no pyplot global state, so it is safe in
Streamlit's threads). No patient name or ID appears on it: only the study and
series UIDs, which the reading radiologist can look up.
"""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from app.domain import Series, StudyResult
from app.ui import BANNER
from app.ui.viewer import key_image

A4_INCHES = (8.27, 11.69)
PNG_DPI = 150
KEY_IMAGES = 3
SUSPICIOUS_COLOUR, CLEAR_COLOUR = "#b3261e", "#1b6e3a"
FORMATS = {"pdf": "application/pdf", "png": "image/png"}


def _model_line(result: StudyResult) -> str:
    m = result.model
    variant = f", variant {m.variant}" if m.variant else ""
    return f"Model: {m.name} {m.version}{variant} (sha256 {m.sha256[:12]}…)"


def _draw_slice_chart(fig: Figure, rect: list[float], result: StudyResult) -> None:
    ax = fig.add_axes(rect)
    p = np.array([s.probability for s in result.slices])
    number = np.arange(1, len(p) + 1)
    for f in result.findings:
        ax.axvspan(f.slice_start + 0.5, f.slice_end + 1.5, color=SUSPICIOUS_COLOUR, alpha=0.12, lw=0)
    ax.plot(number, p, color="#1f4e79", lw=1.2)
    ax.axhline(result.threshold, color=SUSPICIOUS_COLOUR, ls="--", lw=1, label=f"threshold {result.threshold:.2f}")
    ax.set_xlim(0.5, len(p) + 0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("slice (1 = first in the series, sorted along the body axis)", fontsize=8)
    ax.set_ylabel("lesion probability", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax.set_title("Per-slice probability", fontsize=9, loc="left")


def _draw_key_images(fig: Figure, bottom: float, height: float, series: Series, result: StudyResult) -> None:
    indices = result.key_slices(KEY_IMAGES)
    width = 0.9 / KEY_IMAGES
    for column, index in enumerate(indices):
        ax = fig.add_axes([0.05 + column * width, bottom, width - 0.01, height])
        ax.imshow(key_image(series.hu[index], result, index))
        ax.set_axis_off()
        s = result.slices[index]
        ax.set_title(f"slice {index + 1}  z {s.z_mm:.1f} mm  p {s.probability:.2f}", fontsize=7)


def build_summary(series: Series, result: StudyResult, fmt: str = "pdf") -> bytes:
    """The one-page summary as PDF or PNG bytes (not the upload's file names: exports often name the patient)."""
    if fmt not in FORMATS:
        raise ValueError(f"summary format must be one of {sorted(FORMATS)}, not {fmt!r}")
    fig = Figure(figsize=A4_INCHES)
    FigureCanvasAgg(fig)
    colour = SUSPICIOUS_COLOUR if result.positive else CLEAR_COLOUR
    fig.text(0.05, 0.965, "Lytic lesion screening - AI result summary", fontsize=15, weight="bold")
    fig.text(0.05, 0.94, BANNER, fontsize=10, color="white", weight="bold",
             bbox={"facecolor": "#8a5300", "edgecolor": "none", "pad": 4})
    fig.text(0.05, 0.895, result.triage_label, fontsize=14, weight="bold", color=colour)
    lines = [
        f"Study probability: {result.probability:.1%} (threshold {result.threshold:.1%})",
        f"Study Instance UID: {result.study_instance_uid}",
        f"Series Instance UID: {result.series_instance_uid}",
        f"Slices analysed: {len(result.slices)}",
        _model_line(result),
        f"Generated: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
    ]
    fig.text(0.05, 0.875, "\n".join(lines), fontsize=8.5, va="top", linespacing=1.6)
    _draw_slice_chart(fig, [0.1, 0.56, 0.85, 0.17], result)
    fig.text(0.05, 0.505, "Key images (bone window, heatmap overlay, findings boxed)", fontsize=9)
    _draw_key_images(fig, 0.27, 0.22, series, result)
    notes = [f"F{n}: slices {f.slice_start + 1}-{f.slice_end + 1} (z {f.z_start_mm:.1f} to {f.z_end_mm:.1f} mm), "
             f"peak p {f.peak_probability:.2f} on slice {f.peak_slice + 1}"
             for n, f in enumerate(result.findings, start=1)] or ["No slice reached the threshold."]
    notes += [f"Warning: {w}" for w in result.warnings]
    fig.text(0.05, 0.245, "Findings\n" + "\n".join(notes[:14]), fontsize=8, va="top", linespacing=1.5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=PNG_DPI)
    return buffer.getvalue()
