"""Per-patient torso anatomy as a function of the body level z, painted into axial slabs.

Coordinates are DICOM LPS patient millimetres: +x = patient left, +y = posterior,
+z = superior; z = 0 is the level of the femoral head centres. The patient lies
supine on a curved table whose top is at ``Anatomy.table_y``. Everything a slab
shows is derived from the frozen :class:`Anatomy` and the slab, so neighbouring
slices are 3D-consistent (ribs drift with z, spheres and z-intervals use slab
partial volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .shapes import (
    SliceCanvas,
    capsule,
    capsule_distance,
    ellipse,
    ellipse_distance,
    sphere_box,
    sphere_slab_fraction,
)

# Codes of SliceCanvas.bone_kind. The neural arch is "vertebra" for lesions, but kept
# apart so lesion placement can favour the vertebral body (red marrow).
BONE_KINDS = {"vertebra": 1, "pelvis": 2, "rib": 3, "femur": 4, "sternum": 5, "vertebral_arch": 6}

AIR_HU = -1000.0
SKIN_HU = 35.0
DISC_HU = 80.0
CSF_HU = 15.0
EPIDURAL_FAT_HU = -70.0
BLOOD_HU = 42.0
CARTILAGE_HU = 110.0
_TROCHANTER_X = 45.0  # greater trochanter centre, lateral of the femoral head centre (mm)


@dataclass(frozen=True)
class Vertebra:
    name: str  # "L3", "T12", ...
    z_bottom: float  # inferior endplate of the body (mm)
    z_top: float  # superior endplate
    half_width: float  # body semi-axes (mm)
    half_depth: float
    y_center: float  # body centre y (mm)
    trabecular_hu: float
    canal_half_width: float
    canal_half_depth: float
    arch_mm: float  # thickness of the neural arch ring
    spinous_mm: float  # length of the spinous process
    transverse_mm: float  # length of a transverse process
    lumbar: bool

    @property
    def height(self) -> float:
        return self.z_top - self.z_bottom

    @property
    def z_mid(self) -> float:
        return 0.5 * (self.z_bottom + self.z_top)

    @property
    def canal_y(self) -> float:
        return self.y_center + self.half_depth + self.canal_half_depth


@dataclass(frozen=True)
class Organ:
    """An axis-aligned ellipsoid of one tissue; ``gas_fraction`` > 0 puts a gas cap anteriorly."""

    name: str
    hu: float
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    gas_fraction: float = 0.0


@dataclass(frozen=True)
class Rib:
    """One rib: a band along the rib ring from the spine (theta 0) towards the sternum (theta pi).

    Its centre line descends anteriorly: z(theta) = z_head - drop * s**1.4, s in [0, 1].
    """

    side: int  # +1 patient left, -1 patient right
    number: int  # 1..12
    z_head: float
    drop: float
    theta_start: float
    theta_end: float
    cartilage_rad: float  # the anterior part that is costal cartilage
    height: float  # extent in z (mm)
    thickness: float  # radial thickness (mm)

    def z_at(self, theta: np.ndarray | float) -> np.ndarray | float:
        s = np.clip((theta - self.theta_start) / (self.theta_end - self.theta_start), 0.0, 1.0)
        return self.z_head - self.drop * s**1.4

    def theta_range(self, z0: float, z1: float) -> tuple[float, float] | None:
        """Angles where the rib centre line lies within [z0, z1], or None."""
        lo = (self.z_head - z1) / self.drop
        hi = (self.z_head - z0) / self.drop
        if hi < 0.0 or lo > 1.0:
            return None
        span = self.theta_end - self.theta_start
        s0 = max(lo, 0.0) ** (1 / 1.4)
        s1 = min(hi, 1.0) ** (1 / 1.4)
        return self.theta_start + s0 * span, self.theta_start + s1 * span


@dataclass(frozen=True)
class Anatomy:
    """One synthetic patient: body habitus, skeleton, organs and bone densities."""

    age: int
    sex: str
    outline_z: tuple[float, ...]  # knots of the body outline along z
    outline_half_width: tuple[float, ...]
    outline_half_depth: tuple[float, ...]
    table_y: float  # y of the posterior skin / table pad surface
    table_pad_mm: float
    table_width: float
    fat_mm: float  # subcutaneous fat (abdomen)
    vertebrae: tuple[Vertebra, ...]  # L5 .. T1, ascending z
    sacrum_top: float
    sacrum_bottom: float
    sacrum_y: float  # S1 body centre y
    sacrum_half_width: float
    head_radius: float
    head_x: float  # |x| of the femoral head centres
    head_y: float
    iliac_crest_z: float
    diaphragm_z: float
    ribs: tuple[Rib, ...]
    sternum_z: tuple[float, float]
    organs: tuple[Organ, ...]  # painted in this order inside the cavity
    bowel: tuple[tuple[float, float, float, float, float], ...]  # x, y, z, radius, content HU
    lung_vessels: tuple[tuple[float, ...], ...]  # x, y, z0, z1, radius, dx/dz, dy/dz
    aortic_calcifications: tuple[tuple[float, float, float, float], ...]  # angle, z0, z1, HU
    aorta_radius: float
    lung_hu: float
    fat_hu: float
    muscle_hu: float
    trabecular_hu: float  # vertebral trabecular mean
    cortical_hu: float  # the blurred vertebral shell rim
    dense_cortical_hu: float  # thick cortices (femoral shaft, ribs, pelvic rims)
    cortex_mm: float
    texture_hu: float  # trabecular texture amplitude
    texture_mm: float  # trabecular texture grain
    osteoporotic: bool

    # ---- smooth profiles along z -------------------------------------------------
    def outline(self, z: float) -> tuple[float, float, float]:
        """Body ellipse at level z: (half width, half depth, centre y)."""
        a = float(np.interp(z, self.outline_z, self.outline_half_width))
        b = float(np.interp(z, self.outline_z, self.outline_half_depth))
        return a, b, self.table_y - 0.92 * b

    def subcutaneous_fat(self, z: float) -> float:
        return _fat_profile(self.fat_mm, z)

    def spine_y(self, z: float) -> float:
        """Vertebral body centre y at level z (sacrum below S1)."""
        zs = [self.sacrum_bottom, self.sacrum_top] + [v.z_mid for v in self.vertebrae]
        ys = [self.sacrum_y + 35.0, self.sacrum_y] + [v.y_center for v in self.vertebrae]
        return float(np.interp(z, zs, ys))

    def vertebra_near(self, z: float) -> Vertebra:
        return min(self.vertebrae, key=lambda v: abs(v.z_mid - z))

    def muscle_ellipse(self, z: float) -> tuple[float, float, float]:
        a, b, cy = self.outline(z)
        f = self.subcutaneous_fat(z)
        f_ant, f_post, f_lat = f, 0.6 * f, 1.15 * f
        y_top = cy - b + f_ant
        y_bot = self.table_y - f_post
        return a - f_lat, 0.5 * (y_bot - y_top) / 0.96, 0.5 * (y_top + y_bot)

    def cavity(self, z: float) -> tuple[float, float, float]:
        """Body cavity ellipse at level z: (half width, half depth, centre y); half width 0 = none."""
        a_m, b_m, cy_m = self.muscle_ellipse(z)
        pelvic_limit = float(
            np.interp(
                z,
                (-45.0, -25.0, 20.0, 70.0, self.iliac_crest_z - 10.0, self.iliac_crest_z + 30.0),
                (0.0, self.head_x - 45.0, self.head_x - 30.0, self.head_x + 5.0, self.head_x + 30.0, 999.0),
            )
        )
        a_c = min(a_m - 14.0, pelvic_limit)
        y_ant = cy_m - b_m + 13.0
        if z < self.sacrum_top:
            u = (self.sacrum_top - z) / (self.sacrum_top - self.sacrum_bottom)
            y_post = self.sacrum_y + 30.0 * u - 16.0
        else:
            v = self.vertebra_near(z)
            y_post = v.y_center + 2.0 * v.half_depth
        return a_c, 0.5 * (y_post - y_ant), 0.5 * (y_post + y_ant)

    def rib_ring(self, z: float) -> tuple[float, float, float]:
        a_c, b_c, cy_c = self.cavity(z)
        return a_c + 4.5, b_c + 4.5, cy_c


def _fat_profile(fat_mm: float, z: float) -> float:
    """Subcutaneous fat thickness at level z: thickest over the abdomen and hips."""
    return fat_mm * float(np.interp(z, (-80.0, 100.0, 250.0, 400.0, 600.0), (1.0, 1.2, 1.1, 0.75, 0.7)))


# ---- painting ---------------------------------------------------------------------


def paint_slice(canvas: SliceCanvas, anat: Anatomy, bones_only: bool = False) -> None:
    """Paint the anatomy of the slab ``canvas.z +- thickness/2`` onto the canvas.

    ``bones_only`` skips soft tissue (used to find where bone is when placing lesions).
    """
    z = canvas.z
    if not bones_only:
        _paint_table(canvas, anat)
        _paint_body(canvas, anat, z)
        _paint_organs(canvas, anat, z)
    _paint_spine(canvas, anat, bones_only)
    _paint_sacrum(canvas, anat)
    _paint_pelvis(canvas, anat)
    _paint_femurs(canvas, anat)
    _paint_ribs(canvas, anat)
    _paint_sternum(canvas, anat)


def _paint_table(c: SliceCanvas, anat: Anatomy) -> None:
    top = anat.table_y + anat.table_pad_mm
    box = c.box(-anat.table_width / 2, anat.table_width / 2, top - 30.0, top + 50.0)
    if box is None:
        return
    # A concave carbon-fibre shell over a foam core, optionally under a foam pad.
    depth = box.y - (_table_surface(anat, box.x) + np.float32(anat.table_pad_mm))
    inside_x = c.edge(np.abs(box.x) - np.float32(anat.table_width / 2))
    shell = c.edge(np.abs(depth - 1.5) - 1.5) + c.edge(np.abs(depth - 40.0) - 1.5)
    core = c.edge(np.abs(depth - 20.75) - 17.75) * 0.6
    pad = c.edge(np.abs(depth + anat.table_pad_mm / 2) - anat.table_pad_mm / 2) if anat.table_pad_mm else 0.0
    c.paint(box, np.minimum(shell, 1.0) * inside_x, 260.0)
    c.paint(box, core * inside_x, -900.0)
    if anat.table_pad_mm:
        c.paint(box, pad * inside_x * 0.95, -850.0)


def _paint_body(c: SliceCanvas, anat: Anatomy, z: float) -> None:
    a, b, cy = anat.outline(z)
    a_m, b_m, cy_m = anat.muscle_ellipse(z)
    skin = 2.0
    layers = (
        ((a, b, cy), 0.0, SKIN_HU),
        ((a - skin, b - skin, cy), skin, anat.fat_hu),
        ((a_m, b_m, cy_m), 0.6 * anat.subcutaneous_fat(z), anat.muscle_hu),
    )
    for (ea, eb, ecy), depth, hu in layers:
        hit = ellipse(c, 0.0, ecy, ea, eb)
        if hit is not None:
            box, cov = hit
            _cut_at_table(c, anat, box, cov, depth)
            c.paint(box, cov, hu)
    a_c, b_c, cy_c = anat.cavity(z)
    if a_c > 5.0 and b_c > 5.0:
        hit = ellipse(c, 0.0, cy_c, a_c, b_c)
        if hit is not None:
            cbox, cov = hit
            c.cavity[cbox.rows, cbox.cols] = cov
            c.paint(cbox, cov, anat.fat_hu - 5.0)


def _table_surface(anat: Anatomy, x: np.ndarray) -> np.ndarray:
    """y of the concave table top (edges curve up, towards anterior)."""
    return anat.table_y - x * x * np.float32(1.0 / 2400.0)


def _cut_at_table(c: SliceCanvas, anat: Anatomy, box, cov: np.ndarray, depth_mm: float) -> None:
    """The back rests on the table: clip a layer's coverage ``depth_mm`` above the table top (in place)."""
    lowest = anat.table_y - depth_mm - float(np.max(box.x * box.x)) / 2400.0 - c.spacing
    start = int(np.searchsorted(box.y[:, 0], lowest))
    if start < cov.shape[0]:
        below = box.y[start:] - (_table_surface(anat, box.x) - np.float32(depth_mm))
        np.minimum(cov[start:], c.edge(below), out=cov[start:])


def _paint_organs(c: SliceCanvas, anat: Anatomy, z: float) -> None:
    for x, y, zc, r, content in anat.bowel:
        _paint_ball(c, x, y, zc, r, anat.muscle_hu - 10.0)
        _paint_ball(c, x, y, zc, r - 2.0, content)
    _paint_lungs(c, anat, z)
    for organ in anat.organs:
        _paint_organ(c, organ)
    _paint_vessels(c, anat, z)
    _paint_psoas(c, anat, z)


def _paint_ball(c: SliceCanvas, x: float, y: float, zc: float, r: float, hu: float) -> None:
    box = sphere_box(c, x, y, zc, r)
    if box is not None:
        c.paint(box, sphere_slab_fraction(box, c, x, y, zc, r) * c.cavity[box.rows, box.cols], hu)


def _organ_section(c: SliceCanvas, center, radii):
    """(box, coverage) of an ellipsoid's cross-section at the slab centre, or None."""
    cx, cy, cz = center
    rx, ry, rz = radii
    k = 1.0 - ((c.z - cz) / rz) ** 2
    if k <= 0.0:
        return None
    k = math.sqrt(k)
    return ellipse(c, cx, cy, rx * k, ry * k)


def _paint_organ(c: SliceCanvas, organ: Organ) -> None:
    hit = _organ_section(c, organ.center, organ.radii)
    if hit is None:
        return
    box, cov = hit
    cov = cov * c.cavity[box.rows, box.cols]
    if organ.gas_fraction:
        # Supine: gas rises anteriorly (small y), fluid layers posteriorly with a flat level.
        level = organ.center[1] - organ.radii[1] * (1.0 - 2.0 * organ.gas_fraction)
        gas = c.edge(box.y - np.float32(level))
        c.paint(box, cov, organ.hu)
        c.paint(box, cov * gas, AIR_HU)
    else:
        c.paint(box, cov, organ.hu)


def _lung_sections(anat: Anatomy, z: float):
    bottom = anat.diaphragm_z - 75.0
    if z <= bottom:
        return []
    a_c, b_c, cy_c = anat.cavity(z)
    k = math.sqrt(min((z - bottom) / 60.0, 1.0)) * float(np.interp(z, (560.0, 680.0), (1.0, 0.55)))
    return [(side * 0.5 * a_c, cy_c + 0.05 * b_c, 0.5 * a_c * k, 0.97 * b_c * k) for side in (-1, 1)]


def _paint_lungs(c: SliceCanvas, anat: Anatomy, z: float) -> None:
    for lx, ly, rx, ry in _lung_sections(anat, z):
        hit = ellipse(c, lx, ly, rx, ry)
        if hit is None:
            continue
        box, cov = hit
        # Dependent (posterior) lung is denser in a supine patient.
        value = anat.lung_hu + np.float32(50.0 / ry) * (box.y - np.float32(ly))
        c.paint(box, cov * c.cavity[box.rows, box.cols], value)
    if not anat.lung_vessels:
        return
    for x, y, z0, z1, r, dxdz, dydz in anat.lung_vessels:
        if not z0 <= z <= z1:
            continue
        hit = ellipse(c, x + dxdz * (z - z0), y + dydz * (z - z0), r, r)
        if hit is not None:
            box, cov = hit
            lung = c.hu[box.rows, box.cols] < -500.0
            c.paint(box, cov * lung, BLOOD_HU)


def _paint_vessels(c: SliceCanvas, anat: Anatomy, z: float) -> None:
    v = anat.vertebra_near(z)
    y_spine = anat.spine_y(z)
    bif = anat.vertebrae[1].z_mid  # aortic bifurcation at L4
    r = anat.aorta_radius
    if z >= bif:
        w = float(np.interp(z, (anat.diaphragm_z - 30.0, anat.diaphragm_z + 30.0), (0.0, 1.0)))
        ax = (1 - w) * 12.0 + w * (v.half_width + r - 2.0)
        ay = (1 - w) * (y_spine - v.half_depth - r - 2.0) + w * (y_spine - 0.2 * v.half_depth)
        hit = ellipse(c, ax, ay, r, r)
        if hit is not None:
            c.paint(hit[0], hit[1], BLOOD_HU)
            for angle, z0, z1, hu in anat.aortic_calcifications:
                if z0 <= z <= z1:
                    spot = ellipse(
                        c, ax + (r - 1.2) * math.cos(angle), ay + (r - 1.2) * math.sin(angle), 1.4, 1.4
                    )
                    if spot is not None:
                        c.paint(spot[0], spot[1], hu)
    elif z > 80.0:
        for side in (-1, 1):
            hit = ellipse(c, side * (8.0 + 0.35 * (bif - z)), y_spine - 30.0 - 0.1 * (bif - z), 6.5, 6.5)
            if hit is not None:
                c.paint(hit[0], hit[1] * c.cavity[hit[0].rows, hit[0].cols], BLOOD_HU)
    if 90.0 < z < anat.diaphragm_z + 10.0:
        hit = ellipse(c, -(0.6 * v.half_width + 14.0), y_spine - v.half_depth - 9.0, 13.0, 9.0)
        if hit is not None:
            c.paint(hit[0], hit[1] * c.cavity[hit[0].rows, hit[0].cols], BLOOD_HU - 3.0)


def _paint_psoas(c: SliceCanvas, anat: Anatomy, z: float) -> None:
    l1 = anat.vertebrae[4]
    if not 20.0 < z < l1.z_top:
        return
    knots = (20.0, 110.0, anat.sacrum_top, anat.vertebrae[2].z_mid, l1.z_top)
    x = float(np.interp(z, knots, (anat.head_x - 12.0, 58.0, 42.0, 36.0, 26.0)))
    y_spine = anat.spine_y(z)
    y = float(np.interp(z, knots, (anat.head_y - 22.0, anat.sacrum_y - 55.0, y_spine, y_spine, y_spine)))
    r = float(np.interp(z, knots, (17.0, 20.0, 20.0, 15.0, 5.0)))
    for side in (-1, 1):
        hit = ellipse(c, side * x, y, r, r * 1.05)
        if hit is not None:
            c.paint(hit[0], hit[1], anat.muscle_hu + 3.0)


# ---- skeleton -----------------------------------------------------------------------


def _cortical_shell(outer: np.ndarray, inner: np.ndarray, trab, cortex_hu: float):
    """Mean HU of a pixel that is partly cortex (outer - inner) and partly trabecular (inner)."""
    return (inner * trab + (outer - inner) * cortex_hu) / np.maximum(outer, np.float32(1e-3))


def _paint_spine(c: SliceCanvas, anat: Anatomy, bones_only: bool) -> None:
    half = c.thickness / 2.0
    verts = anat.vertebrae
    for i, v in enumerate(verts):
        disc_below = (verts[i - 1].z_top if i else anat.sacrum_top, v.z_bottom)
        disc_above = (v.z_top, verts[i + 1].z_bottom if i + 1 < len(verts) else v.z_top + 5.0)
        if c.z + half < disc_below[0] - 20.0 or c.z - half > disc_above[1] + 20.0:
            continue
        if not bones_only and disc_below[0] <= c.z < disc_above[0]:
            # Ligaments, epidural fat and muscle hug the spine: no cavity content touches bone.
            hit = ellipse(
                c, 0.0, v.y_center + 0.8 * v.half_depth, v.half_width + 5.0, 1.9 * v.half_depth + 4.0
            )
            if hit is not None:
                c.paint(hit[0], hit[1], anat.muscle_hu - 10.0)
        _paint_posterior_elements(c, anat, v, disc_below, disc_above)
        _paint_vertebral_body(
            c, anat, v, disc_below, disc_above if i + 1 < len(verts) else None, first=i == 0
        )


def _paint_vertebral_body(c: SliceCanvas, anat: Anatomy, v: Vertebra, disc_below, disc_above, first: bool):
    endplate = 1.0
    f_trab = c.zfrac(v.z_bottom + endplate, v.z_top - endplate)
    f_end = c.zfrac(v.z_bottom, v.z_bottom + endplate) + c.zfrac(v.z_top - endplate, v.z_top)
    f_disc = (c.zfrac(*disc_above) if disc_above else 0.0) + (c.zfrac(*disc_below) if first else 0.0)
    if f_trab + f_end + f_disc <= 0.0:
        return
    a, b, y = v.half_width, v.half_depth, v.y_center
    box = c.box(-a * 1.06, a * 1.06, y - b * 1.06, y + b * 1.06)
    if box is None:
        return
    # Kidney-shaped body: an ellipse with a posterior concavity for the canal.
    notch = c.edge(-ellipse_distance(box, 0.0, y + 1.3 * b, 0.42 * a, 0.5 * b))
    outer = np.minimum(c.edge(ellipse_distance(box, 0.0, y, a, b)), notch)
    cortex = anat.cortex_mm
    inner = np.minimum(
        c.edge(ellipse_distance(box, 0.0, y, a - cortex, b - cortex)),
        c.edge(-ellipse_distance(box, 0.0, y + 1.3 * b, 0.42 * a + cortex, 0.5 * b + cortex)),
    )
    bone_cov = (f_trab + f_end) * outer
    alpha = bone_cov.copy()
    mix = np.float32(0.0)
    if f_trab:
        trab = c.trabecular(box, v.trabecular_hu, anat.texture_hu)
        mix = mix + f_trab * (inner * trab + (outer - inner) * anat.cortical_hu)
    if f_end:
        mix = mix + f_end * outer * anat.cortical_hu
    bone_mix = mix
    if f_disc:
        disc = c.edge(ellipse_distance(box, 0.0, y + 0.02 * b, a * 1.04, b * 1.04))
        alpha += f_disc * disc
        mix = mix + f_disc * disc * DISC_HU
    # Blend: slab fractions of body, endplates and disc over what is underneath.
    c.blend_bone(box, alpha, mix, bone_mix, bone_cov, BONE_KINDS["vertebra"])


def _paint_posterior_elements(c: SliceCanvas, anat: Anatomy, v: Vertebra, disc_below, disc_above) -> None:
    kind = BONE_KINDS["vertebral_arch"]
    h = v.height
    y_canal = v.canal_y
    cw, cd = v.canal_half_width, v.canal_half_depth
    ring = v.arch_mm
    arch_hu = 0.5 * (anat.cortical_hu + v.trabecular_hu)
    # Canal contents wherever this vertebra is the nearest one.
    f_canal = c.zfrac(0.5 * (disc_below[0] + disc_below[1]), 0.5 * (disc_above[0] + disc_above[1]))
    if f_canal > 0:
        hit = ellipse(c, 0.0, y_canal, cw, cd)
        if hit is not None:
            c.paint(hit[0], hit[1] * min(f_canal * 2.0, 1.0), EPIDURAL_FAT_HU)
        hit = ellipse(c, 0.0, y_canal + 0.5, cw * 0.7, cd * 0.75)
        if hit is not None:
            c.paint(hit[0], hit[1] * min(f_canal * 2.0, 1.0), CSF_HU)
    # Pedicles (anterior half of the arch) span the upper body; the lamina extends lower.
    f_ped = c.zfrac(v.z_bottom + 0.3 * h, v.z_top - 0.08 * h)
    f_lam = c.zfrac(v.z_bottom - 0.6 * (disc_below[1] - disc_below[0]), v.z_top - 0.2 * h)
    if f_ped or f_lam:
        box = c.box(-cw - ring, cw + ring, y_canal - cd - ring - 3.0, y_canal + cd + ring)
        if box is not None:
            outer = c.edge(ellipse_distance(box, 0.0, y_canal, cw + ring, cd + ring))
            hole = c.edge(-ellipse_distance(box, 0.0, y_canal, cw, cd))
            f = np.where(box.y < y_canal, np.float32(f_ped), np.float32(f_lam))
            cov = np.minimum(outer, hole) * f
            c.paint_bone(box, cov, c.trabecular(box, arch_hu, 0.5 * anat.texture_hu), kind)
    if v.lumbar:
        f_sp = c.zfrac(v.z_bottom - 0.05 * h, v.z_top - 0.15 * h)
        sp_width = 3.2
    else:
        f_sp = c.zfrac(v.z_bottom - 0.7 * h, v.z_bottom + 0.45 * h)
        sp_width = 2.6
    if f_sp:
        y0 = y_canal + cd + ring - 1.0
        _paint_process(c, anat, v, f_sp, (0.0, y0, 0.0, y0 + v.spinous_mm), sp_width)
    # Articular processes: the facet joints bridge the disc level behind the canal.
    disc_lo = disc_below[1] - disc_below[0]
    disc_hi = disc_above[1] - disc_above[0]
    facets = (
        (c.zfrac(v.z_top - 0.35 * h, v.z_top + 0.8 * disc_hi), cw + 3.0, 0.2 * cd, 4.5),  # superior
        (c.zfrac(v.z_bottom - 0.8 * disc_lo, v.z_bottom + 0.35 * h), cw + 1.5, 0.9 * cd, 4.0),  # inferior
    )
    tilt = 0.5 if v.lumbar else 1.2  # lumbar facets face sideways, thoracic ones backwards
    for f_facet, x, dy, r in facets:
        if not f_facet:
            continue
        for side in (-1, 1):
            hit = ellipse(c, side * x, y_canal + dy, 0.7 * r, 1.4 * r, side * tilt)
            if hit is not None:
                c.paint_bone(hit[0], hit[1] * f_facet, arch_hu, kind)
    f_tp = c.zfrac(v.z_bottom + 0.4 * h, v.z_top - 0.1 * h)
    if f_tp:
        back = -2.0 if v.lumbar else 0.45 * v.transverse_mm
        for side in (-1, 1):
            x0 = side * (cw + 0.6 * ring)
            _paint_process(
                c, anat, v, f_tp, (x0, y_canal - 1.0, x0 + side * v.transverse_mm, y_canal + back), 3.8
            )


def _paint_process(c: SliceCanvas, anat: Anatomy, v: Vertebra, f: float, segment, radius: float) -> None:
    """A spinous or transverse process: a capsule of cortical shell around trabecular bone."""
    hit = capsule(c, *segment, radius)
    if hit is None:
        return
    box, outer = hit
    inner = c.edge(capsule_distance(box, *segment, radius - 1.1))
    trab = c.trabecular(box, v.trabecular_hu, anat.texture_hu)
    c.paint_bone(
        box,
        outer * f,
        _cortical_shell(outer, inner, trab, anat.dense_cortical_hu * 0.8),
        BONE_KINDS["vertebral_arch"],
    )


def _paint_sacrum(c: SliceCanvas, anat: Anatomy) -> None:
    f = c.zfrac(anat.sacrum_bottom, anat.sacrum_top)
    if not f:
        return
    z = min(max(c.z, anat.sacrum_bottom), anat.sacrum_top)
    u = (anat.sacrum_top - z) / (anat.sacrum_top - anat.sacrum_bottom)
    w = anat.sacrum_half_width * (1.0 - 0.72 * u**0.8)
    d = 17.0 - 10.0 * u
    y = anat.sacrum_y + 30.0 * u
    box = c.box(-w - 2, w + 2, y - d - 2, y + 1.6 * d + 2)
    if box is None:
        return
    # Body in the middle, alae laterally (thinner, more posterior).
    body = ellipse_distance(box, 0.0, y, 0.45 * w + 4.0, d)
    ala = ellipse_distance(box, 0.0, y + 0.35 * d, w, 0.75 * d)
    dist = np.minimum(body, ala)
    cortex = anat.cortex_mm + 0.3
    outer = c.edge(dist)
    inner = c.edge(dist + cortex)
    trab = c.trabecular(box, 0.9 * anat.trabecular_hu, anat.texture_hu)
    value = _cortical_shell(outer, inner, trab, anat.cortical_hu)
    c.paint_bone(box, outer * f, value, BONE_KINDS["pelvis"])
    canal = ellipse(c, 0.0, y + 0.95 * d, 10.0 * (1.0 - u) + 3.0, 4.0)
    if canal is not None:
        c.paint(canal[0], canal[1] * f, EPIDURAL_FAT_HU)
    for side in (-1, 1):
        hole = ellipse(c, side * 0.45 * w, y + 0.2 * d, 3.5 * (1.0 - u) + 1.5, 3.5 * (1.0 - u) + 1.5)
        if hole is not None:
            c.paint(hole[0], hole[1] * f, EPIDURAL_FAT_HU)


def _ilium_section(anat: Anatomy, z: float):
    """Iliac band at level z: (centre x, centre y, rx, ry, theta0, theta1) for the side x > 0."""
    if z < 28.0 or z > anat.iliac_crest_z:
        return None
    u = (z - 28.0) / (anat.iliac_crest_z - 28.0)
    cx = anat.sacrum_half_width - 4.0
    cy = 0.5 * (anat.sacrum_y + anat.head_y) - 5.0
    ry = anat.sacrum_y - cy + 8.0
    rx = (1 - u) * (anat.head_x - cx - 8.0) + u * (0.85 * anat.head_x + 18.0 - cx)
    theta0 = 1.0 - 0.9 * min(u / 0.45, 1.0)
    theta1 = 1.75 + 0.35 * u
    return cx, cy, rx, ry, theta0, theta1, u


def _paint_pelvis(c: SliceCanvas, anat: Anatomy) -> None:
    kind = BONE_KINDS["pelvis"]
    sec = _ilium_section(anat, c.z)
    f_crest = c.zfrac(-1e9, anat.iliac_crest_z)
    trab = 0.9 * anat.trabecular_hu
    if sec is not None:
        cx, cy, rx, ry, t0, t1, u = sec
        for side in (-1, 1):
            xs = (side * cx, side * (cx + rx))
            box = c.box(min(xs) - 12.0, max(xs) + 12.0, cy - ry - 12.0, cy + ry + 12.0)
            if box is None:
                continue
            dx = (box.x - np.float32(side * cx)) * np.float32(side)
            dy = box.y - np.float32(cy)
            theta = np.arctan2(dx / np.float32(rx), dy / np.float32(ry))
            dist = ellipse_distance(box, side * cx, cy, rx, ry)
            # Thin wing in the middle, thick near the sacroiliac joint and the acetabulum.
            s = np.clip((theta - t0) / (t1 - t0), 0.0, 1.0)
            thick = (
                (1 - u) * 20.0
                + u * 5.0
                + 14.0 * np.exp(-((s / 0.18) ** 2))
                + 6.0 * np.exp(-(((1 - s) / 0.15) ** 2))
            )
            band = c.edge(np.abs(dist + 0.5 * thick) - 0.5 * thick)
            ends = c.edge(np.maximum(t0 - theta, theta - t1) * np.float32(min(rx, ry)))
            outer = band * ends
            inner = c.edge(np.abs(dist + 0.5 * thick) - (0.5 * thick - 1.6)) * ends
            value = _cortical_shell(
                outer,
                inner,
                c.trabecular(box, trab, anat.texture_hu),
                0.5 * (anat.cortical_hu + anat.dense_cortical_hu),
            )
            c.paint_bone(box, outer * f_crest, value, kind)
    _paint_acetabula(c, anat, kind, trab)
    # Pubis and ischium: capsules and ellipses with z extents.
    hx, hy = anat.head_x, anat.head_y
    parts = (
        ((-15.0, 8.0), "capsule", (hx - 22.0, hy - 12.0, 16.0, hy - 52.0, 8.0)),
        ((-40.0, 0.0), "ellipse", (11.0, hy - 56.0, 9.0, 13.0)),
        ((-55.0, -25.0), "capsule", (13.0, hy - 52.0, hx - 25.0, hy + 22.0, 6.5)),
        ((-60.0, -5.0), "ellipse", (hx - 18.0, hy + 28.0, 13.0, 19.0)),
    )
    for (z0, z1), shape, p in parts:
        f = c.zfrac(z0, z1)
        if not f:
            continue
        for side in (-1, 1):
            if shape == "capsule":
                hit = capsule(c, side * p[0], p[1], side * p[2], p[3], p[4])
            else:
                hit = ellipse(c, side * p[0], p[1], p[2], p[3])
            if hit is None:
                continue
            box, outer = hit
            if shape == "capsule":
                inner = c.edge(capsule_distance(box, side * p[0], p[1], side * p[2], p[3], p[4]) + 1.6)
            else:
                inner = c.edge(ellipse_distance(box, side * p[0], p[1], p[2] - 1.6, p[3] - 1.6))
            value = _cortical_shell(
                outer, inner, c.trabecular(box, trab, anat.texture_hu), anat.dense_cortical_hu
            )
            c.paint_bone(box, outer * f, value, kind)


def _paint_acetabula(c: SliceCanvas, anat: Anatomy, kind: int, trab: float) -> None:
    z = c.z
    if not -25.0 < z < 45.0:
        return
    r_head = anat.head_radius
    r_in = math.sqrt(max((r_head + 2.5) ** 2 - z * z, 0.0))
    r_out = math.sqrt(max((r_head + 14.0) ** 2 - z * z, 0.0))
    if r_out <= 0.0:
        return
    lateral_limit = float(np.interp(z, (-25.0, 0.0, 28.0), (-4.0, 2.0, r_out)))
    for side in (-1, 1):
        cx = side * anat.head_x
        box = c.box(cx - r_out, cx + r_out, anat.head_y - r_out, anat.head_y + r_out)
        if box is None:
            continue
        dx = box.x - np.float32(cx)
        dy = box.y - np.float32(anat.head_y)
        rho = np.sqrt(dx * dx + dy * dy)
        outer = np.minimum(c.edge(rho - r_out), c.edge(r_in - rho) if r_in > 0 else 1.0)
        outer = outer * c.edge(dx * np.float32(side) - lateral_limit)
        inner = np.minimum(c.edge(rho - r_out + 1.5), c.edge(r_in + 1.2 - rho) if r_in > 0 else 1.0) * c.edge(
            dx * np.float32(side) - lateral_limit + 1.5
        )
        value = _cortical_shell(
            outer, inner, c.trabecular(box, trab, anat.texture_hu), anat.dense_cortical_hu
        )
        c.paint_bone(box, outer, value, kind)


def _paint_femurs(c: SliceCanvas, anat: Anatomy) -> None:
    kind = BONE_KINDS["femur"]
    r_head = anat.head_radius
    head_trab = 1.15 * anat.trabecular_hu + 20.0
    neck_angle = math.radians(40.0)
    for side in (-1, 1):
        cx, cy = side * anat.head_x, anat.head_y
        box = sphere_box(c, cx, cy, 0.0, r_head)
        if box is not None:
            outer = sphere_slab_fraction(box, c, cx, cy, 0.0, r_head)
            inner = sphere_slab_fraction(box, c, cx, cy, 0.0, r_head - 1.5)
            value = _cortical_shell(
                outer, inner, c.trabecular(box, head_trab, anat.texture_hu), anat.cortical_hu + 150.0
            )
            c.paint_bone(box, outer, value, kind)
        # Neck: a cylinder running laterally and down from the head centre at 40 degrees.
        if -38.0 < c.z < -0.35 * r_head:
            along = -c.z / math.sin(neck_angle)
            nx = cx + side * along * math.cos(neck_angle)
            r_neck = 15.0
            hit = ellipse(c, nx, cy + 3.0, r_neck / math.sin(neck_angle) * 0.8, r_neck)
            if hit is not None:
                box, outer = hit
                inner = c.edge(
                    ellipse_distance(
                        box, nx, cy + 3.0, r_neck / math.sin(neck_angle) * 0.8 - 2.0, r_neck - 2.0
                    )
                )
                value = _cortical_shell(
                    outer, inner, c.trabecular(box, head_trab - 40.0, anat.texture_hu), anat.dense_cortical_hu
                )
                c.paint_bone(box, outer, value, kind)
        f_troch = c.zfrac(-62.0, -8.0)
        if f_troch:
            tx = cx + side * _TROCHANTER_X
            taper = float(np.interp(c.z, (-62.0, -20.0, -8.0), (0.8, 1.0, 0.55)))
            hit = ellipse(c, tx, cy + 8.0, 17.0 * taper, 22.0 * taper)
            if hit is not None:
                box, outer = hit
                inner = c.edge(ellipse_distance(box, tx, cy + 8.0, 17.0 * taper - 1.8, 22.0 * taper - 1.8))
                value = _cortical_shell(
                    outer,
                    inner,
                    c.trabecular(box, anat.trabecular_hu, anat.texture_hu),
                    anat.dense_cortical_hu,
                )
                c.paint_bone(box, outer * f_troch, value, kind)
        f_shaft = c.zfrac(-400.0, -45.0)
        if f_shaft:
            sx = cx + side * 38.0
            hit = ellipse(c, sx, cy + 2.0, 15.0, 15.0)
            if hit is not None:
                box, outer = hit
                inner = c.edge(ellipse_distance(box, sx, cy + 2.0, 9.5, 9.5))
                value = _cortical_shell(outer, inner, -40.0, anat.dense_cortical_hu + 300.0)
                c.paint_bone(box, outer * f_shaft, value, kind)


def _paint_ribs(c: SliceCanvas, anat: Anatomy) -> None:
    if not anat.ribs:
        return
    half = c.thickness / 2.0
    z = c.z
    kind = BONE_KINDS["rib"]
    ra, rb, yc = anat.rib_ring(z)
    if ra <= 10.0:
        return
    for rib in anat.ribs:
        rng_theta = rib.theta_range(z - half - rib.height / 2, z + half + rib.height / 2)
        if rng_theta is None:
            continue
        t0, t1 = rng_theta
        ts = np.linspace(t0, t1, 5)
        px = rib.side * ra * np.sin(ts)
        py = yc + rb * np.cos(ts)
        pad = rib.thickness
        box = c.box(px.min() - pad, px.max() + pad, py.min() - pad, py.max() + pad)
        if box is None:
            continue
        dx = box.x * np.float32(rib.side)
        dy = box.y - np.float32(yc)
        theta = np.arctan2(dx / np.float32(ra), dy / np.float32(rb))
        dist = ellipse_distance(box, 0.0, yc, ra, rb)
        zc = rib.z_at(theta)
        lo = np.maximum(zc - rib.height / 2, z - half)
        hi = np.minimum(zc + rib.height / 2, z + half)
        fz = np.clip((hi - lo) * np.float32(1.0 / c.thickness), 0.0, 1.0)
        on_rib = c.edge(np.maximum(rib.theta_start - theta, theta - rib.theta_end) * np.float32(ra))
        outer = c.edge(np.abs(dist) - rib.thickness / 2) * fz * on_rib
        inner = c.edge(np.abs(dist) - (rib.thickness / 2 - 1.3))
        bony = c.edge((theta - (rib.theta_end - rib.cartilage_rad)) * np.float32(ra))
        marrow = c.trabecular(box, 0.85 * anat.trabecular_hu, anat.texture_hu)
        value = inner * marrow + (1.0 - inner) * anat.dense_cortical_hu
        c.paint(box, outer * (1.0 - bony), CARTILAGE_HU)
        c.paint_bone(box, outer * bony, value, kind)


def _paint_sternum(c: SliceCanvas, anat: Anatomy) -> None:
    z0, z1 = anat.sternum_z
    f = c.zfrac(z0, z1)
    if not f:
        return
    a_c, b_c, cy_c = anat.cavity(c.z)
    manubrium = float(np.interp(c.z, (z0, z1 - 45.0, z1 - 35.0, z1), (0.6, 1.0, 1.7, 1.6)))
    hw, hd = 14.0 * manubrium, 6.5
    y = cy_c - b_c - hd + 1.0
    hit = ellipse(c, 0.0, y, hw, hd)
    if hit is None:
        return
    box, outer = hit
    inner = c.edge(ellipse_distance(box, 0.0, y, hw - 1.2, hd - 1.2))
    value = _cortical_shell(
        outer, inner, c.trabecular(box, 0.8 * anat.trabecular_hu, anat.texture_hu), anat.cortical_hu + 100.0
    )
    c.paint_bone(box, outer * f, value, BONE_KINDS["sternum"])


# ---- sampling -------------------------------------------------------------------------


def trabecular_mean_hu(age: int) -> float:
    """Mean vertebral trabecular density for age (226 HU below 30, -2.5 HU per year)."""
    return 226.0 - 2.5 * max(age - 30, 0)


def sample_anatomy(
    rng: np.random.Generator, age: int, sex: str, osteoporotic: bool, external: bool
) -> Anatomy:
    """Draw one patient. ``external`` widens habitus beyond the training ranges."""
    size = rng.uniform(0.92, 1.08) * (1.04 if sex == "M" else 0.97)
    if external:
        width = rng.choice([rng.uniform(215.0, 255.0), rng.uniform(345.0, 400.0)])
    else:
        width = rng.uniform(260.0, 340.0)
    fat = float(np.clip(5.0 + (width - 250.0) * 0.3 + rng.normal(0.0, 6.0), 3.0, 60.0))
    depth_ratio = rng.uniform(0.6, 0.8) + (width - 300.0) * 0.0006
    outline_z = (-90.0, -20.0, 60.0, 180.0, 300.0, 420.0, 640.0)
    width_factor = (
        0.95,
        1.0,
        0.98,
        rng.uniform(0.84, 0.96),
        rng.uniform(0.88, 0.95),
        rng.uniform(0.92, 1.0),
        0.95,
    )
    depth_factor = (0.9, 0.92, 0.95, 1.0, 1.0, 0.98, 0.92)
    # The hips must hold the greater trochanters with muscle and fat around them.
    head_x = rng.uniform(80.0, 90.0) * size
    hip_need = head_x + _TROCHANTER_X + 17.0 + 18.0 + 1.15 * _fat_profile(fat, 0.0)
    hip_floor = (hip_need * 0.97, hip_need, hip_need * 0.9, 0.0, 0.0, 0.0, 0.0)
    half_width = tuple(
        float(max(width / 2 * f, floor)) for f, floor in zip(width_factor, hip_floor, strict=True)
    )
    half_depth = tuple(float(width / 2 * depth_ratio * f) for f in depth_factor)
    table_y = float(0.92 * half_depth[3] + rng.normal(0.0, 8.0))
    pad = float(rng.uniform(8.0, 25.0)) if rng.random() < 0.5 else 0.0

    # Bone densities: age-related mean, osteoporosis lowers density and thins the cortex.
    if osteoporotic:
        trab = float(rng.uniform(55.0, 135.0))
        cortical = float(rng.uniform(300.0, 430.0))
        cortex_mm = float(rng.uniform(0.6, 0.85))
        texture_hu, texture_mm = float(rng.uniform(45.0, 70.0)), float(rng.uniform(1.1, 1.6))
    else:
        trab = float(np.clip(trabecular_mean_hu(age) + rng.normal(0.0, 25.0), 165.0, 300.0))
        cortical = float(rng.uniform(430.0, 680.0))
        cortex_mm = float(rng.uniform(0.9, 1.2))
        texture_hu, texture_mm = float(rng.uniform(30.0, 50.0)), float(rng.uniform(0.6, 0.9))
    dense_cortical = float(rng.uniform(850.0, 1150.0)) * (0.85 if osteoporotic else 1.0)

    head_radius = 23.5 * size + rng.normal(0.0, 0.8)
    head_y = table_y - 0.92 * half_depth[1] * 0.98 - 8.0
    sacrum_top = rng.uniform(145.0, 162.0) * size
    sacrum_bottom = sacrum_top - rng.uniform(95.0, 108.0) * size
    sacrum_y = table_y - 0.6 * _fat_profile(fat, sacrum_top) - rng.uniform(55.0, 68.0)

    vertebrae = []
    z = sacrum_top
    names = [f"L{i}" for i in range(5, 0, -1)] + [f"T{i}" for i in range(12, 0, -1)]
    lordosis = (6.0, 10.0, 12.0, 10.0, 6.0)
    for k, name in enumerate(names):
        lumbar = name.startswith("L")
        t = 0.0 if lumbar else (k - 5) / 11.0  # 0 at T12 .. 1 at T1
        disc = rng.uniform(8.0, 11.0) * size if lumbar else (6.0 - 1.5 * t) * size * rng.uniform(0.9, 1.1)
        height = (
            rng.uniform(24.0, 28.0) * size if lumbar else (21.5 - 5.0 * t) * size * rng.uniform(0.95, 1.05)
        )
        if lumbar:
            hw = (rng.uniform(21.0, 24.0) + (0.5 - k * 0.5)) * size
            hd = rng.uniform(15.0, 17.5) * size
            canal_w, canal_d, arch, spinous, transverse = 11.0, 8.0, 5.5, 28.0, 24.0
        else:
            hw = (19.5 - 7.0 * t) * size * rng.uniform(0.95, 1.05)
            hd = (14.5 - 4.5 * t) * size * rng.uniform(0.95, 1.05)
            canal_w, canal_d, arch, spinous, transverse = 8.5 - 1.0 * t, 7.0, 4.5, 30.0, 18.0
        z_bottom = z + disc
        z_top = z_bottom + height
        z_mid = 0.5 * (z_bottom + z_top)
        back = (
            0.6 * _fat_profile(fat, z_mid)
            + 4.0
            + spinous
            + arch
            + 2 * canal_d
            + hd
            + (lordosis[k] if lumbar else 0.0)
        )
        vertebrae.append(
            Vertebra(
                name=name,
                z_bottom=float(z_bottom),
                z_top=float(z_top),
                half_width=float(hw),
                half_depth=float(hd),
                y_center=float(table_y - back),
                trabecular_hu=float(trab + rng.normal(0.0, 8.0)),
                canal_half_width=float(canal_w),
                canal_half_depth=float(canal_d),
                arch_mm=float(arch),
                spinous_mm=float(spinous),
                transverse_mm=float(transverse),
                lumbar=lumbar,
            )
        )
        z = z_top
    by_name = {v.name: v for v in vertebrae}
    diaphragm_z = by_name["T10"].z_mid + rng.uniform(-10.0, 10.0)

    ribs = []
    drops = (25, 45, 75, 85, 90, 95, 95, 92, 88, 80, 50, 30)
    ends = (2.45, 2.7, 2.75, 2.75, 2.75, 2.75, 2.7, 2.55, 2.45, 2.35, 1.95, 1.6)
    for number in range(1, 13):
        for side in (-1, 1):
            ribs.append(
                Rib(
                    side=side,
                    number=number,
                    z_head=float(by_name[f"T{number}"].z_mid + 3.0 + rng.normal(0.0, 1.0)),
                    drop=float(drops[number - 1] * size * rng.uniform(0.9, 1.1)),
                    theta_start=0.3,
                    theta_end=float(ends[number - 1] + rng.normal(0.0, 0.03)),
                    cartilage_rad=0.5 if number <= 10 else 0.0,
                    height=float((15.0 if number == 1 else 12.0) * rng.uniform(0.9, 1.1)),
                    thickness=float((8.0 if number == 1 else 7.0) * rng.uniform(0.9, 1.1)),
                )
            )
    sternum_z = (float(by_name["T9"].z_mid), float(by_name["T2"].z_mid))

    anat = Anatomy(
        age=int(age),
        sex=sex,
        outline_z=outline_z,
        outline_half_width=half_width,
        outline_half_depth=half_depth,
        table_y=table_y,
        table_pad_mm=pad,
        table_width=float(rng.uniform(440.0, 520.0)),
        fat_mm=fat,
        vertebrae=tuple(vertebrae),
        sacrum_top=float(sacrum_top),
        sacrum_bottom=float(sacrum_bottom),
        sacrum_y=float(sacrum_y),
        sacrum_half_width=float(rng.uniform(48.0, 55.0) * size),
        head_radius=float(head_radius),
        head_x=float(head_x),
        head_y=float(head_y),
        iliac_crest_z=float(by_name["L4"].z_mid + rng.uniform(-6.0, 6.0)),
        diaphragm_z=float(diaphragm_z),
        ribs=tuple(ribs),
        sternum_z=sternum_z,
        organs=(),
        bowel=(),
        lung_vessels=(),
        aortic_calcifications=(),
        aorta_radius=float(rng.uniform(9.5, 12.0) + 0.04 * max(age - 50, 0)),
        lung_hu=float(rng.uniform(-880.0, -810.0)),
        fat_hu=float(rng.uniform(-110.0, -80.0)),
        muscle_hu=float(rng.uniform(40.0, 58.0)),
        trabecular_hu=trab,
        cortical_hu=cortical,
        dense_cortical_hu=dense_cortical,
        cortex_mm=cortex_mm,
        texture_hu=texture_hu,
        texture_mm=texture_mm,
        osteoporotic=osteoporotic,
    )
    # Soft tissue depends on the cavity, which depends on the skeleton: add it second.
    return _with_soft_tissue(anat, rng)


def _with_soft_tissue(anat: Anatomy, rng: np.random.Generator) -> Anatomy:
    zd = anat.diaphragm_z
    by_name = {v.name: v for v in anat.vertebrae}

    organs = []
    a, b, cy = anat.cavity(zd - 40.0)
    organs.append(
        Organ(
            "stomach",
            15.0,
            (0.38 * a, cy - 0.35 * b, zd - 40.0),
            (0.32 * a, 0.4 * b, 55.0),
            rng.uniform(0.1, 0.4),
        )
    )
    a, b, cy = anat.cavity(zd - 60.0)
    organs.append(
        Organ(
            "liver", rng.uniform(52.0, 66.0), (-0.4 * a, cy - 0.02 * b, zd - 60.0), (0.62 * a, 0.85 * b, 95.0)
        )
    )
    a, b, cy = anat.cavity(zd - 110.0)
    organs.append(Organ("gallbladder", 10.0, (-0.42 * a, cy - 0.5 * b, zd - 110.0), (13.0, 13.0, 30.0)))
    a, b, cy = anat.cavity(zd - 40.0)
    organs.append(
        Organ(
            "spleen", rng.uniform(44.0, 52.0), (0.66 * a, cy + 0.45 * b, zd - 40.0), (0.25 * a, 0.4 * b, 50.0)
        )
    )
    a, b, cy = anat.cavity(zd + 55.0)
    organs.append(
        Organ("pericardial fat", anat.fat_hu, (0.15 * a, cy - 0.22 * b, zd + 55.0), (0.47 * a, 0.6 * b, 75.0))
    )
    organs.append(
        Organ(
            "heart", rng.uniform(35.0, 45.0), (0.15 * a, cy - 0.22 * b, zd + 55.0), (0.42 * a, 0.54 * b, 70.0)
        )
    )
    kidney_z = by_name["L1"].z_bottom
    for side in (-1, 1):
        zk = kidney_z - (12.0 if side < 0 else 0.0)
        v = anat.vertebra_near(zk)
        x = side * (v.half_width + 48.0)
        y = v.y_center + 8.0
        organs.append(Organ("kidney", rng.uniform(28.0, 36.0), (x, y, zk), (25.0, 22.0, 55.0)))
        organs.append(Organ("renal sinus fat", anat.fat_hu, (x - side * 9.0, y - 4.0, zk), (9.0, 8.0, 28.0)))
    a, b, cy = anat.cavity(20.0)
    organs.append(
        Organ(
            "bladder",
            rng.uniform(4.0, 14.0),
            (0.0, anat.head_y - 32.0, rng.uniform(10.0, 35.0)),
            (rng.uniform(30.0, 50.0), rng.uniform(22.0, 38.0), rng.uniform(25.0, 42.0)),
        )
    )

    bowel = []
    for _ in range(70):
        z = rng.uniform(0.0, zd - 50.0)
        a, b, cy = anat.cavity(z)
        if a < 20.0 or b < 20.0:
            continue
        r = np.sqrt(rng.random()) * 0.85
        phi = rng.uniform(0.0, 2 * np.pi)
        x, y = a * r * np.cos(phi), cy + b * r * np.sin(phi)
        if abs(x) < 55.0 and y > anat.spine_y(z) - 40.0:
            continue  # bowel lies anterior to the spine and psoas
        content = rng.choice([-1000.0, 12.0, -120.0], p=[0.3, 0.45, 0.25])
        bowel.append((float(x), float(y), float(z), float(rng.uniform(8.0, 20.0)), float(content)))

    vessels = []
    for _ in range(220):
        z0 = rng.uniform(zd - 60.0, 640.0)
        sections = _lung_sections(anat, z0)
        if not sections:
            continue
        lx, ly, rx, ry = sections[rng.integers(2)]
        r = np.sqrt(rng.random()) * 0.9
        phi = rng.uniform(0.0, 2 * np.pi)
        hilum = 1.0 - r  # large vessels near the hilum
        vessels.append(
            (
                float(lx + rx * r * np.cos(phi)),
                float(ly + ry * r * np.sin(phi)),
                float(z0),
                float(z0 + rng.uniform(15.0, 50.0)),
                float(0.7 + 3.2 * hilum**2 + rng.uniform(0.0, 0.5)),
                float(rng.normal(0.0, 0.4)),
                float(rng.normal(0.0, 0.4)),
            )
        )

    n_calc = rng.poisson(max(anat.age - 45, 0) / 2.0)
    calcs = []
    for _ in range(n_calc):
        z0 = rng.uniform(anat.vertebrae[1].z_mid, 620.0)
        calcs.append(
            (
                float(rng.uniform(0, 2 * np.pi)),
                float(z0),
                float(z0 + rng.uniform(2.0, 9.0)),
                float(rng.uniform(350.0, 900.0)),
            )
        )

    return replace(
        anat,
        organs=tuple(organs),
        bowel=tuple(bowel),
        lung_vessels=tuple(vessels),
        aortic_calcifications=tuple(calcs),
    )
