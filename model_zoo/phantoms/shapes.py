"""Vectorised painting primitives for one axial CT slab (numpy only).

A :class:`SliceCanvas` holds one slab ``[z - t/2, z + t/2]`` being painted in HU on a
pixel grid in patient millimetres (DICOM LPS: +x = patient left, +y = posterior).
Every primitive evaluates only the pixels of its bounding box and returns an
anti-aliased coverage in [0, 1]; painting blends ``hu += coverage * (value - hu)``,
so the order of painting is the order of occlusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Box(NamedTuple):
    """Pixels of a bounding box: index slices and the mm coordinates of their centres."""

    rows: slice
    cols: slice
    y: np.ndarray  # (n, 1) float32
    x: np.ndarray  # (1, m) float32


@dataclass
class SliceCanvas:
    """One axial slab being painted; arrays are (rows, cols)."""

    x0: float  # x (mm) of the centre of column 0
    y0: float  # y (mm) of the centre of row 0
    spacing: float
    z: float  # slab centre (mm)
    thickness: float
    hu: np.ndarray  # float32
    bone: np.ndarray  # float32 bone coverage B (fraction of the pixel's slab column that is bone)
    bone_hu: np.ndarray  # float32 S = B * (mean HU of that bone): hu = (1 - B) * other + S
    bone_kind: np.ndarray  # int8, see anatomy.BONE_KINDS
    cavity: np.ndarray  # float32 coverage of the body cavity (organs stay inside it)
    texture: np.ndarray | None  # float32 unit-variance trabecular texture, None = smooth bone
    xs: np.ndarray
    ys: np.ndarray
    has_bone: bool = False  # soft tissue painted before any bone need not update bone_hu

    @classmethod
    def blank(
        cls,
        x0: float,
        y0: float,
        spacing: float,
        shape: tuple[int, int],
        z: float,
        thickness: float,
        fill_hu: float,
        texture: np.ndarray | None = None,
    ) -> SliceCanvas:
        rows, cols = shape
        return cls(
            x0=x0,
            y0=y0,
            spacing=spacing,
            z=z,
            thickness=thickness,
            hu=np.full(shape, fill_hu, dtype=np.float32),
            bone=np.zeros(shape, dtype=np.float32),
            bone_hu=np.zeros(shape, dtype=np.float32),
            bone_kind=np.zeros(shape, dtype=np.int8),
            cavity=np.zeros(shape, dtype=np.float32),
            texture=texture,
            xs=(x0 + spacing * np.arange(cols)).astype(np.float32),
            ys=(y0 + spacing * np.arange(rows)).astype(np.float32),
        )

    def box(self, xmin: float, xmax: float, ymin: float, ymax: float) -> Box | None:
        """The pixels whose centres may lie in [xmin, xmax] x [ymin, ymax] (one pixel margin)."""
        s = self.spacing
        c0 = max(int(np.floor((xmin - self.x0) / s)), 0)
        c1 = min(int(np.ceil((xmax - self.x0) / s)) + 1, self.hu.shape[1])
        r0 = max(int(np.floor((ymin - self.y0) / s)), 0)
        r1 = min(int(np.ceil((ymax - self.y0) / s)) + 1, self.hu.shape[0])
        if c0 >= c1 or r0 >= r1:
            return None
        return Box(slice(r0, r1), slice(c0, c1), self.ys[r0:r1, None], self.xs[None, c0:c1])

    def zfrac(self, z0: float, z1: float) -> float:
        """Fraction of the slab inside [z0, z1] (slab partial volume of a z-interval)."""
        half = self.thickness / 2.0
        return max(0.0, min(z1, self.z + half) - max(z0, self.z - half)) / self.thickness

    def edge(self, distance_mm: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage from a signed distance to a boundary (negative inside)."""
        return np.clip(0.5 - distance_mm * (1.0 / self.spacing), 0.0, 1.0)

    def paint(self, box: Box, coverage: np.ndarray, value: float | np.ndarray) -> None:
        """Paint soft tissue: it displaces whatever (bone included) it covers."""
        view = self.hu[box.rows, box.cols]
        view += coverage * (value - view)
        if self.has_bone:
            self.bone_hu[box.rows, box.cols] *= 1.0 - coverage

    def paint_bone(self, box: Box, coverage: np.ndarray, value: float | np.ndarray, kind: int) -> None:
        """Paint bone: HU, bone material and coverage, and (where coverage >= 0.5) the bone kind."""
        view = self.hu[box.rows, box.cols]
        view += coverage * (value - view)
        material = self.bone_hu[box.rows, box.cols]
        material += coverage * (value - material)
        self._mark_bone(box, coverage, kind)

    def blend_bone(
        self,
        box: Box,
        alpha: np.ndarray,
        mix: np.ndarray,
        bone_mix: np.ndarray,
        coverage: np.ndarray,
        kind: int,
    ) -> None:
        """Lay a mixture over a box: hu = (1 - alpha) hu + mix, of which bone_mix is bone material.

        For objects whose slab holds several materials (a vertebral body with endplates and discs).
        """
        view = self.hu[box.rows, box.cols]
        view *= 1.0 - alpha
        view += mix
        material = self.bone_hu[box.rows, box.cols]
        material *= 1.0 - alpha
        material += bone_mix
        self._mark_bone(box, coverage, kind)

    def _mark_bone(self, box: Box, coverage: np.ndarray, kind: int) -> None:
        bone = self.bone[box.rows, box.cols]
        np.maximum(bone, coverage, out=bone)
        self.bone_kind[box.rows, box.cols][coverage >= 0.5] = kind
        self.has_bone = True

    def replace_bone(self, box: Box, fraction: np.ndarray, value: float, stays_bone: bool) -> None:
        """Fill the bone inside a region (fraction of each pixel's slab column) with ``value``.

        Only the bone part of a pixel changes (a lesion at an endplate leaves the disc
        alone); ``stays_bone`` says if the new content counts as bone material (a bone
        island) or not (a lytic lesion). Bone coverage, the anatomical bone mask, is kept.
        """
        bone = self.bone[box.rows, box.cols]
        material = self.bone_hu[box.rows, box.cols]
        delta = fraction * (bone * np.float32(value) - material)
        self.hu[box.rows, box.cols] += delta
        if stays_bone:
            material += delta
        else:
            material *= 1.0 - fraction

    def trabecular(self, box: Box, mean_hu: float, amplitude_hu: float) -> np.ndarray | float:
        """Textured trabecular bone HU over a box (plain mean when the canvas has no texture)."""
        if self.texture is None:
            return mean_hu
        return mean_hu + amplitude_hu * self.texture[box.rows, box.cols]


def ellipse_distance(box: Box, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse with semi-axes a (along angle) and b."""
    dx = box.x - cx
    dy = box.y - cy
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = dx * c + dy * s, dy * c - dx * s
    u = dx * np.float32(1.0 / a)
    v = dy * np.float32(1.0 / b)
    q = np.sqrt(u * u + v * v)
    # First-order distance (q - 1) / |grad q|; exact on circles, good near the boundary.
    gx = u * np.float32(1.0 / a)
    gy = v * np.float32(1.0 / b)
    grad = np.sqrt(gx * gx + gy * gy) / np.maximum(q, np.float32(1e-6))
    return (q - 1.0) / np.maximum(grad, np.float32(1e-6))


def ellipse(canvas: SliceCanvas, cx: float, cy: float, a: float, b: float, angle: float = 0.0):
    """(box, coverage) of a filled ellipse, or None when it misses the canvas."""
    if a <= 0 or b <= 0:
        return None
    if not angle:
        return _ellipse_rows(canvas, cx, cy, a, b)
    r = max(a, b)
    box = canvas.box(cx - r, cx + r, cy - r, cy + r)
    if box is None:
        return None
    return box, canvas.edge(ellipse_distance(box, cx, cy, a, b, angle))


def _ellipse_rows(canvas: SliceCanvas, cx: float, cy: float, a: float, b: float):
    """Axis-aligned ellipse from its half-width per row: 4 array operations instead of ~15.

    The half-width is averaged over the upper and lower half of each pixel row, so
    the top and bottom of the ellipse are anti-aliased too.
    """
    box = canvas.box(cx - a, cx + a, cy - b, cy + b)
    if box is None:
        return None
    quarter = 0.25 * canvas.spacing
    half_width = np.zeros(box.y.shape, dtype=np.float32)
    for dy in (-quarter, quarter):
        v = (box.y + np.float32(dy - cy)) * np.float32(1.0 / b)
        half_width += np.sqrt(np.maximum(1.0 - v * v, 0.0))
    half_width *= np.float32(0.5 * a / canvas.spacing)
    # Coverage along the row: half-width (in pixels) minus the distance from the centre.
    cover = half_width + np.float32(0.5) - np.abs(box.x - np.float32(cx)) * np.float32(1.0 / canvas.spacing)
    return box, np.clip(cover, 0.0, 1.0, out=cover)


def capsule_distance(box: Box, ax: float, ay: float, bx: float, by: float, radius: float) -> np.ndarray:
    """Signed distance (mm) to a capsule: the segment A-B thickened by radius."""
    ex, ey = bx - ax, by - ay
    length2 = max(ex * ex + ey * ey, 1e-9)
    px = box.x - ax
    py = box.y - ay
    t = np.clip((px * ex + py * ey) * np.float32(1.0 / length2), 0.0, 1.0)
    dx = px - t * ex
    dy = py - t * ey
    return np.sqrt(dx * dx + dy * dy) - radius


def capsule(canvas: SliceCanvas, ax: float, ay: float, bx: float, by: float, radius: float):
    """(box, coverage) of a capsule, or None when it misses the canvas."""
    box = canvas.box(min(ax, bx) - radius, max(ax, bx) + radius, min(ay, by) - radius, max(ay, by) + radius)
    if box is None:
        return None
    return box, canvas.edge(capsule_distance(box, ax, ay, bx, by, radius))


def sphere_slab_fraction(
    box: Box, canvas: SliceCanvas, cx: float, cy: float, cz: float, radius: float
) -> np.ndarray:
    """Per pixel, the fraction of the slab column inside a sphere (analytic chord length)."""
    dx = box.x - cx
    dy = box.y - cy
    half_chord = np.sqrt(np.maximum(np.float32(radius * radius) - (dx * dx + dy * dy), 0.0))
    lo = canvas.z - canvas.thickness / 2.0 - cz
    hi = canvas.z + canvas.thickness / 2.0 - cz
    inside = np.minimum(half_chord, np.float32(hi)) - np.maximum(-half_chord, np.float32(lo))
    return np.clip(inside * np.float32(1.0 / canvas.thickness), 0.0, 1.0)


def sphere_box(canvas: SliceCanvas, cx: float, cy: float, cz: float, radius: float) -> Box | None:
    """Bounding box of a sphere's footprint on the slab, None if the sphere misses the slab."""
    half = canvas.thickness / 2.0
    if cz - radius >= canvas.z + half or cz + radius <= canvas.z - half:
        return None
    return canvas.box(cx - radius, cx + radius, cy - radius, cy + radius)
