"""Synthetic whole-body low-dose CT studies with myeloma lytic lesions and their mimics.

``sample_study_spec(seed, index)`` draws everything random about one study (patient,
anatomy, scanner, lesions, hard negatives, identifiers) into a frozen
:class:`StudySpec`; ``render_study(spec)`` turns it into HU slices, masks and
per-slice labels. Both are deterministic, so a data set is reproducible from
``(seed, index)`` alone.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.fft
from pydicom.uid import generate_uid
from scipy import ndimage

from .anatomy import (
    AIR_HU,
    BONE_KINDS,
    DISC_HU,
    Anatomy,
    Vertebra,
    paint_slice,
    sample_anatomy,
)
from .scanner import apply_scanner
from .shapes import SliceCanvas, capsule, ellipse, sphere_box, sphere_slab_fraction

# Bump whenever the pixels or truth for a given (seed, index) change, so caches can key on it.
GENERATOR_VERSION = "1"
MATRIX = 512
Z_RANGE_MM = (-45.0, 560.0)  # femoral shafts .. upper thorax
LESION_BONES = ("vertebra", "pelvis", "rib", "femur", "sternum")
LESION_BONE_WEIGHTS = (0.5, 0.2, 0.14, 0.09, 0.07)
HARD_NEGATIVE_KINDS = ("osteoporosis", "bone_island", "schmorl_node", "basivertebral_vein", "osteophyte")
_UID_NAMESPACE = "model_zoo.phantoms/1"


@dataclass(frozen=True)
class ScannerParams:
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slice_spacing_mm: float  # SpacingBetweenSlices (<= thickness: overlapping reconstruction)
    noise_sigma_hu: float
    kernel: str  # "SOFT" | "STANDARD" | "BONE"
    kernel_name: str  # the vendor's ConvolutionKernel name
    hu_offset: float
    psf_sigma_mm: float
    edge_enhance: float  # mid-frequency boost of sharp kernels (edge overshoot)
    noise_low_freq: float  # > 0: blotchy noise texture of iterative reconstruction
    kvp: float
    bone_hu_scale: float  # positive HU scale vs 120 kVp (lower kVp -> brighter bone)
    manufacturer: str
    model_name: str
    fov_center_xy_mm: tuple[float, float]  # reconstruction centre in patient x, y
    noise_anisotropy: float = 0.0  # left-right noise streaking of wide patients, 0..1


@dataclass(frozen=True)
class Lesion:
    center_mm: tuple[float, float, float]  # DICOM patient x, y, z
    diameter_mm: float
    bone: str  # "vertebra" | "pelvis" | "rib" | "femur" | "sternum"
    shape: str  # "round" | "lobulated"
    hu: float
    lobes: tuple[
        tuple[float, float, float, float], ...
    ]  # spheres (dx, dy, dz, radius) whose union is the lesion


@dataclass(frozen=True)
class HardNegative:
    kind: str  # one of HARD_NEGATIVE_KINDS
    center_mm: tuple[float, float, float] | None  # None for the diffuse osteoporosis
    size_mm: float | None
    vertebra: str | None = None  # host vertebra for spine findings
    hu: float | None = None


@dataclass(frozen=True)
class StudySpec:
    seed: int
    index: int
    positive: bool
    n_slices: int
    external: bool
    scanner: ScannerParams
    age: int
    sex: str
    z_start_mm: float
    lesions: tuple[Lesion, ...]
    hard_negatives: tuple[HardNegative, ...]
    patient_name: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    anatomy: Anatomy = field(repr=False)

    @property
    def z_mm(self) -> np.ndarray:
        """Slice centres, most inferior first."""
        return self.z_start_mm + self.scanner.slice_spacing_mm * np.arange(self.n_slices)

    @property
    def origin_xy_mm(self) -> tuple[float, float]:
        """Patient x, y of the centre of pixel (0, 0)."""
        cx, cy = self.scanner.fov_center_xy_mm
        half = (MATRIX - 1) / 2.0 * self.scanner.pixel_spacing_mm
        return cx - half, cy - half


@dataclass
class PhantomStudy:
    spec: StudySpec
    hu: np.ndarray  # float32 (K, 512, 512), integer-valued HU incl. blur, noise and offset
    z_mm: np.ndarray  # (K,) strictly increasing slice centres (ImagePositionPatient z)
    pixel_spacing_mm: float
    origin_xy_mm: tuple[float, float]  # patient x, y of the centre of pixel (0, 0)
    lesion_mask: np.ndarray  # bool (K, 512, 512)
    bone_mask: np.ndarray  # bool (K, 512, 512)
    slice_labels: np.ndarray  # int8 (K,): 1 positive, 0 negative, -1 ambiguous

    def truth(self) -> dict:
        """The ground truth of this study as JSON-able data."""
        spec = self.spec
        return {
            "generator_version": GENERATOR_VERSION,
            "index": spec.index,
            "seed": spec.seed,
            "positive": spec.positive,
            "external": spec.external,
            "study_instance_uid": spec.study_instance_uid,
            "series_instance_uid": spec.series_instance_uid,
            "frame_of_reference_uid": spec.frame_of_reference_uid,
            "patient_id": spec.patient_id,
            "patient_name": spec.patient_name,
            "age": spec.age,
            "sex": spec.sex,
            "n_slices": spec.n_slices,
            "slice_z_mm": [round(float(z), 3) for z in self.z_mm],
            "slice_labels": [int(v) for v in self.slice_labels],
            "pixel_spacing_mm": spec.scanner.pixel_spacing_mm,
            "levels": covered_levels(spec),
            "osteoporotic": spec.anatomy.osteoporotic,
            "lesions": [
                {
                    "center_mm": [round(c, 2) for c in les.center_mm],
                    "diameter_mm": round(les.diameter_mm, 2),
                    "bone": les.bone,
                    "shape": les.shape,
                    "hu": round(les.hu, 1),
                }
                for les in spec.lesions
            ],
            "hard_negatives": [
                {
                    "kind": hn.kind,
                    "center_mm": None if hn.center_mm is None else [round(c, 2) for c in hn.center_mm],
                    "size_mm": None if hn.size_mm is None else round(hn.size_mm, 2),
                    "vertebra": hn.vertebra,
                }
                for hn in spec.hard_negatives
            ],
            "scanner": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec.scanner).items()},
        }


def covered_levels(spec: StudySpec) -> list[str]:
    """Names of the vertebrae whose bodies the study covers."""
    z = spec.z_mm
    return [v.name for v in spec.anatomy.vertebrae if v.z_top > z[0] and v.z_bottom < z[-1]]


# ---- sampling -------------------------------------------------------------------------

_SCANNERS = (
    ("SIEMENS", "SOMATOM Definition AS+", {"SOFT": "B30f", "STANDARD": "B45f", "BONE": "B70f"}),
    ("GE MEDICAL SYSTEMS", "Revolution CT", {"SOFT": "SOFT", "STANDARD": "STANDARD", "BONE": "BONE"}),
    ("Philips", "iCT 256", {"SOFT": "B", "STANDARD": "C", "BONE": "D"}),
    ("Canon Medical Systems", "Aquilion ONE", {"SOFT": "FC08", "STANDARD": "FC18", "BONE": "FC30"}),
)
_FIRST_NAMES = {
    "M": (
        "James",
        "Peter",
        "Ahmed",
        "Luca",
        "Jan",
        "Mateo",
        "Kenji",
        "Olu",
        "Henrik",
        "David",
        "Tomasz",
        "Rafael",
    ),
    "F": (
        "Maria",
        "Anna",
        "Fatima",
        "Sofia",
        "Ingrid",
        "Mei",
        "Grace",
        "Elena",
        "Aisha",
        "Claire",
        "Noor",
        "Julia",
    ),
}
_LAST_NAMES = (
    "Schmidt",
    "Rossi",
    "Okafor",
    "Nakamura",
    "Kowalski",
    "Haddad",
    "Jensen",
    "Garcia",
    "Dubois",
    "Novak",
    "Fischer",
    "Silva",
    "Murphy",
    "Larsen",
    "Moreau",
    "Khan",
    "Petrov",
    "Van Dijk",
    "Horvat",
    "Lindqvist",
)


def _uid(seed: int, index: int, what: str) -> str:
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), str(index), what])


def _sample_scanner(rng: np.random.Generator, external: bool) -> ScannerParams:
    """Acquisition and reconstruction settings; the field of view is fitted later (_fit_fov)."""
    manufacturer, model, kernel_names = _SCANNERS[rng.integers(len(_SCANNERS))]
    if external:
        sharp = rng.random() < 0.5
        kernel = "BONE" if sharp else "SOFT"
        psf = rng.uniform(0.22, 0.3) if sharp else rng.uniform(1.2, 1.6)
        edge = rng.uniform(0.7, 1.0) if sharp else 0.0
        noise = rng.uniform(85.0, 110.0)
        thickness = rng.uniform(3.5, 5.0)
        kvp = float(rng.choice([80.0, 100.0]))
        bone_scale = rng.uniform(1.18, 1.3) if kvp == 80.0 else rng.uniform(1.1, 1.18)
        offset = rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 30.0)
    else:
        kernel = str(rng.choice(["SOFT", "STANDARD", "BONE"], p=[0.3, 0.3, 0.4]))
        psf = {
            "SOFT": rng.uniform(0.75, 1.0),
            "STANDARD": rng.uniform(0.55, 0.75),
            "BONE": rng.uniform(0.35, 0.5),
        }[kernel]
        edge = {"SOFT": 0.0, "STANDARD": rng.uniform(0.0, 0.15), "BONE": rng.uniform(0.2, 0.6)}[kernel]
        noise = math.exp(rng.uniform(math.log(15.0), math.log(80.0)))
        if kernel == "BONE":
            noise = max(noise, 30.0)
        thickness = rng.uniform(1.0, 3.0)
        kvp = float(rng.choice([120.0, 140.0], p=[0.8, 0.2]))
        bone_scale = rng.uniform(0.98, 1.03) if kvp == 120.0 else rng.uniform(0.93, 0.97)
        offset = rng.uniform(-15.0, 15.0)
    thickness = round(thickness, 2)
    slice_spacing = thickness if rng.random() < 0.6 else round(thickness * rng.uniform(0.6, 0.9), 2)
    return ScannerParams(
        pixel_spacing_mm=1.0,  # replaced by _fit_fov once the covered z range is known
        slice_thickness_mm=float(thickness),
        slice_spacing_mm=float(slice_spacing),
        noise_sigma_hu=round(float(noise), 2),
        kernel=kernel,
        kernel_name=kernel_names[kernel],
        hu_offset=round(float(offset), 2),
        psf_sigma_mm=round(float(psf), 3),
        edge_enhance=round(float(edge), 3),
        noise_low_freq=round(float(rng.uniform(0.0, 0.15)), 3),
        kvp=kvp,
        bone_hu_scale=round(float(bone_scale), 3),
        manufacturer=manufacturer,
        model_name=model,
        fov_center_xy_mm=(0.0, 0.0),
    )


def _fit_fov(
    rng, scanner: ScannerParams, anat: Anatomy, z0: float, z1: float, external: bool
) -> ScannerParams:
    """Fit the reconstruction field of view to the widest part of the body, as radiographers do.

    Pixel spacing stays in 0.6-1.0 mm (0.5-1.0 mm for the external set), so very large
    patients are truncated at the edge of the field of view, as on real scanners.
    """
    lowest = 0.5 if external else 0.6
    widest = max(anat.outline(z)[0] for z in np.linspace(z0, z1, 5))
    pixel = round(float(np.clip(2.0 * widest * rng.uniform(1.06, 1.25) / MATRIX, lowest, 1.0)), 4)
    _, b, cy = anat.outline(0.5 * (z0 + z1))
    center = (round(float(rng.normal(0.0, 6.0)), 2), round(float(cy + 0.12 * b + rng.normal(0.0, 6.0)), 2))
    # Wide, flat patients streak left-right: the lateral rays cross the most tissue.
    aspect = anat.outline(0.5 * (z0 + z1))[0] / b
    anisotropy = round(float(np.clip(rng.uniform(0.0, 0.8) * (aspect - 1.0) * 1.5, 0.0, 0.8)), 3)
    return replace(scanner, pixel_spacing_mm=pixel, fov_center_xy_mm=center, noise_anisotropy=anisotropy)


class _BoneMaps:
    """Coarse bones-only renders at slice positions, cached, for placing findings inside bone."""

    SPACING = 1.0

    def __init__(self, anat: Anatomy, thickness: float):
        self.anat = anat
        self.thickness = thickness
        self._cache: dict[float, SliceCanvas] = {}

    def at(self, z: float) -> SliceCanvas:
        key = round(z, 3)
        if key not in self._cache:
            y_top = self.anat.table_y - 330.0
            canvas = SliceCanvas.blank(-200.0, y_top, self.SPACING, (345, 401), z, self.thickness, AIR_HU)
            paint_slice(canvas, self.anat, bones_only=True)
            self._cache[key] = canvas
        return self._cache[key]

    def pick(
        self, rng: np.random.Generator, z: float, bone: str, margin_mm: float
    ) -> tuple[float, float, float] | None:
        """A random point of the given bone at level z at least margin_mm inside it: (x, y, depth_mm)."""
        canvas = self.at(z)
        mask = (canvas.bone_kind == BONE_KINDS[bone]) & (canvas.bone >= 0.5)
        if not mask.any():
            return None
        depth = ndimage.distance_transform_edt(mask) * self.SPACING
        rows, cols = np.nonzero(depth >= margin_mm)
        if len(rows) == 0:
            return None
        i = rng.integers(len(rows))
        r, c = rows[i], cols[i]
        return float(canvas.xs[c]), float(canvas.ys[r]), float(depth[r, c])


def _lesion_lobes(
    rng: np.random.Generator, radius: float, lobulated: bool
) -> tuple[tuple[float, float, float, float], ...]:
    if not lobulated:
        return ((0.0, 0.0, 0.0, radius),)
    lobes = [(0.0, 0.0, 0.0, 0.75 * radius)]
    for _ in range(int(rng.integers(2, 4))):
        r = rng.uniform(0.45, 0.6) * radius
        d = rng.normal(size=3)
        d[2] *= 0.6  # lobes spread mostly in-plane
        d *= (radius - r) / np.linalg.norm(d)
        lobes.append((float(d[0]), float(d[1]), float(d[2]), float(r)))
    return tuple(lobes)


_MAX_DIAMETER = {"vertebra": 30.0, "pelvis": 30.0, "rib": 10.0, "femur": 25.0, "sternum": 14.0}
_FALLBACK_HOSTS = tuple((bone, bone) for bone in LESION_BONES) + (("vertebra", "vertebral_arch"),)


def _place_lesions(rng, maps: _BoneMaps, z_slices: np.ndarray, n: int) -> tuple[Lesion, ...]:
    """Up to n lesions inside bone, each centred within the covered z range.

    After the weighted draws, a last round tries every bone with a smaller margin, so
    that even a single thick slice through a disc gets its lesion (in the neural arch).
    """
    spacing = float(z_slices[1] - z_slices[0]) if len(z_slices) > 1 else 1.0
    lesions: list[Lesion] = []
    draws = []
    for _ in range(n * 12):
        bone = str(rng.choice(LESION_BONES, p=LESION_BONE_WEIGHTS))
        # Most vertebral lesions sit in the body (red marrow), some in the neural arch.
        host = "vertebral_arch" if bone == "vertebra" and rng.random() < 0.15 else bone
        draws.append((bone, host, 1.5))
    draws += [(bone, host, 1.0) for bone, host in _FALLBACK_HOSTS for _ in range(4)]
    for bone, host, margin in draws:
        if len(lesions) == n:
            break
        # Bone is looked up on the slab of a real slice, so the centre is in bone on that slice.
        z_slice = float(z_slices[rng.integers(len(z_slices))])
        z = float(np.clip(z_slice + rng.uniform(-0.25, 0.25) * spacing, z_slices[0], z_slices[-1]))
        point = maps.pick(rng, z_slice, host, margin_mm=margin)
        if point is None:
            continue
        x, y, depth = point
        # Log-uniform 3-30 mm, limited by the host bone (the lesion may break the cortex).
        cap = min(_MAX_DIAMETER[bone], 2.0 * depth + 4.0)
        if cap < 3.0:
            continue
        diameter = min(math.exp(rng.uniform(math.log(3.0), math.log(30.0))), cap)
        center = (x + rng.uniform(-0.4, 0.4), y + rng.uniform(-0.4, 0.4), z)
        if any(math.dist(center, o.center_mm) < 0.5 * (diameter + o.diameter_mm) + 2.0 for o in lesions):
            continue
        lobulated = diameter >= 8.0 and rng.random() < 0.4
        lesions.append(
            Lesion(
                center_mm=tuple(round(c, 3) for c in center),
                diameter_mm=round(float(diameter), 3),
                bone=bone,
                shape="lobulated" if lobulated else "round",
                hu=round(float(np.clip(rng.normal(45.0, 24.0), -30.0, 120.0)), 2),
                lobes=_lesion_lobes(rng, diameter / 2.0, lobulated),
            )
        )
    return tuple(lesions)


def _vertebrae_with(anat: Anatomy, z0: float, z1: float, where: str) -> list[tuple[Vertebra, float]]:
    """Vertebrae with an endplate (where='endplate') or their mid-height ('mid') inside [z0, z1]."""
    found = []
    for v in anat.vertebrae:
        zs = (v.z_bottom, v.z_top) if where == "endplate" else (v.z_mid,)
        found += [(v, z) for z in zs if z0 <= z <= z1]
    return found


def _place_hard_negative(
    rng, kind: str, anat: Anatomy, maps: _BoneMaps, z_slices: np.ndarray
) -> HardNegative | None:
    z0, z1 = float(z_slices[0]), float(z_slices[-1])
    if kind == "osteoporosis":
        return HardNegative(kind, None, None)
    if kind == "bone_island":
        for _ in range(12):
            size = rng.uniform(3.0, 10.0)
            z = float(z_slices[rng.integers(len(z_slices))])
            bone = str(rng.choice(["vertebra", "pelvis", "femur"], p=[0.5, 0.3, 0.2]))
            point = maps.pick(rng, z, bone, margin_mm=size / 2.0 + 2.0)
            if point is not None:
                return HardNegative(
                    kind,
                    (round(point[0], 3), round(point[1], 3), z),
                    round(size, 3),
                    None,
                    round(float(rng.uniform(800.0, 1200.0)), 1),
                )
        return None
    where = "mid" if kind == "basivertebral_vein" else "endplate"
    candidates = _vertebrae_with(anat, z0, z1, where)
    if not candidates:
        return None
    v, z = candidates[rng.integers(len(candidates))]
    if kind == "schmorl_node":
        size = rng.uniform(4.0, 10.0)
        x = rng.uniform(-0.35, 0.35) * v.half_width
        y = v.y_center + rng.uniform(-0.4, 0.25) * v.half_depth
        inward = 1.0 if z == v.z_bottom else -1.0
        return HardNegative(
            kind, (round(x, 3), round(y, 3), round(z + inward * 0.8, 3)), round(size, 3), v.name, DISC_HU
        )
    if kind == "basivertebral_vein":
        size = rng.uniform(2.0, 3.5)
        return HardNegative(
            kind,
            (round(rng.uniform(-1.5, 1.5), 3), round(v.y_center, 3), round(z + rng.uniform(-2, 2), 3)),
            round(size, 3),
            v.name,
            round(float(rng.uniform(10.0, 60.0)), 1),
        )
    # Osteophyte: a spur at the anterolateral margin of an endplate.
    side = float(rng.choice([-1.0, 1.0]))
    angle = rng.uniform(math.radians(15.0), math.radians(75.0))
    x = side * v.half_width * math.sin(angle)
    y = v.y_center - v.half_depth * math.cos(angle)
    return HardNegative(
        kind, (round(x, 3), round(y, 3), round(z, 3)), round(rng.uniform(3.0, 9.0), 3), v.name, None
    )


def _identity(rng: np.random.Generator, sex: str, age: int) -> tuple[str, str, str, str, str, str]:
    first = _FIRST_NAMES[sex][rng.integers(len(_FIRST_NAMES[sex]))]
    last = _LAST_NAMES[rng.integers(len(_LAST_NAMES))]
    study = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    birth = study - _dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    time = f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    patient_id = f"MRN{rng.integers(1_000_000, 9_999_999)}"
    accession = f"ACC{rng.integers(10_000_000, 99_999_999)}"
    return f"{last}^{first}", patient_id, birth.strftime("%Y%m%d"), study.strftime("%Y%m%d"), time, accession


def sample_study_spec(
    seed: int, index: int, positive: bool | None = None, n_slices: int = 48, external: bool = False
) -> StudySpec:
    """Draw one study, deterministically from (seed, index, positive, n_slices, external).

    ``positive=None`` draws positive/negative 50/50. ``external=True`` draws scanner and
    habitus settings deliberately outside the training ranges (domain-shift evaluation).
    """
    if n_slices < 1:
        raise ValueError(f"a study needs at least one slice, got n_slices={n_slices}")
    rng = np.random.default_rng([int(seed), int(index), 0x6D79])
    drawn_positive = bool(rng.random() < 0.5)
    positive = drawn_positive if positive is None else bool(positive)
    sex = "M" if rng.random() < 0.55 else "F"
    age = int(np.clip(round(rng.normal(66.0, 10.0)), 35, 90))
    n_hard = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15]))
    hard_kinds = [str(k) for k in rng.choice(HARD_NEGATIVE_KINDS, size=n_hard, replace=False)]
    anat = sample_anatomy(rng, age, sex, "osteoporosis" in hard_kinds, external)

    # Scanner first (slice spacing sets the covered length), then where the study lies.
    z_lo, z_hi = Z_RANGE_MM
    scanner = _sample_scanner(rng, external)
    span = (n_slices - 1) * scanner.slice_spacing_mm
    z_start = float(z_lo + rng.uniform(0.0, max(z_hi - z_lo - span, 0.0)))
    z_start = round(z_start, 3)
    z_slices = z_start + scanner.slice_spacing_mm * np.arange(n_slices)
    z_first, z_last = float(z_slices[0]), float(z_slices[-1])
    scanner = _fit_fov(rng, scanner, anat, z_first, z_last, external)

    maps = _BoneMaps(anat, scanner.slice_thickness_mm)
    lesions: tuple[Lesion, ...] = ()
    if positive:
        lesions = _place_lesions(rng, maps, z_slices, 1 + min(int(rng.poisson(1.5)), 7))
        if not lesions:
            raise RuntimeError(f"could not place a lesion in study seed={seed} index={index}")
    hard = tuple(
        h for h in (_place_hard_negative(rng, k, anat, maps, z_slices) for k in hard_kinds) if h is not None
    )
    name, patient_id, birth, study_date, study_time, accession = _identity(rng, sex, age)
    return StudySpec(
        seed=int(seed),
        index=int(index),
        positive=positive,
        n_slices=int(n_slices),
        external=bool(external),
        scanner=scanner,
        age=age,
        sex=sex,
        z_start_mm=z_start,
        lesions=lesions,
        hard_negatives=hard,
        patient_name=name,
        patient_id=patient_id,
        birth_date=birth,
        study_date=study_date,
        study_time=study_time,
        accession_number=accession,
        study_instance_uid=_uid(seed, index, "study"),
        series_instance_uid=_uid(seed, index, "series"),
        frame_of_reference_uid=_uid(seed, index, "frame"),
        anatomy=anat,
    )


# ---- rendering ------------------------------------------------------------------------


class _TrabecularTexture:
    """A periodic 3D texture tile (unit variance) sampled at patient mm: 3D-consistent bone texture.

    Neighbouring slices see correlated texture because they sample nearby planes of the
    same volume; the correlation length along z is longer (trabeculae are vertical).
    """

    PITCH = 0.5  # mm per tile voxel in-plane
    PITCH_Z = 1.0
    SIZE = 160
    SIZE_Z = 48

    def __init__(self, rng: np.random.Generator, grain_mm: float):
        shape = (self.SIZE_Z, self.SIZE, self.SIZE)
        white = rng.standard_normal(shape, dtype=np.float32)
        fz = np.fft.fftfreq(self.SIZE_Z, d=self.PITCH_Z)[:, None, None]
        fy = np.fft.fftfreq(self.SIZE, d=self.PITCH)[None, :, None]
        fx = np.fft.rfftfreq(self.SIZE, d=self.PITCH)[None, None, :]
        gz = 1.6 * grain_mm
        lowpass = np.exp(-2.0 * np.pi**2 * (grain_mm**2 * (fx * fx + fy * fy) + gz * gz * fz * fz))
        tile = scipy.fft.irfftn(scipy.fft.rfftn(white) * lowpass, s=shape).astype(np.float32)
        self.tile = tile / tile.std()

    def plane(self, z: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Texture at the slab centre z on the pixel grid (rows, cols), linear in z."""
        t = z / self.PITCH_Z
        k0 = math.floor(t)
        w = np.float32(t - k0)
        tile2d = self.tile[k0 % self.SIZE_Z] * (1.0 - w) + self.tile[(k0 + 1) % self.SIZE_Z] * w
        rows = np.floor(ys / self.PITCH).astype(np.intp) % self.SIZE
        cols = np.floor(xs / self.PITCH).astype(np.intp) % self.SIZE
        return np.take(np.take(tile2d, rows, axis=0), cols, axis=1)


def _lobes_fraction(box, canvas: SliceCanvas, center, lobes, grow_mm: float = 0.0) -> np.ndarray:
    """Per pixel of the box, the slab fraction inside a union of spheres (max over spheres)."""
    cx, cy, cz = center
    frac = None
    for dx, dy, dz, r in lobes:
        f = sphere_slab_fraction(box, canvas, cx + dx, cy + dy, cz + dz, r + grow_mm)
        frac = f if frac is None else np.maximum(frac, f)
    return frac


def _union_slab_fraction(canvas: SliceCanvas, center, lobes, grow_mm: float = 0.0):
    """(box, fraction) of a union of spheres grown by ``grow_mm``, None if it misses the slab."""
    cx, cy, cz = center
    reach = max(math.hypot(dx, dy, dz) + r for dx, dy, dz, r in lobes) + grow_mm
    box = sphere_box(canvas, cx, cy, cz, reach)
    if box is None:
        return None
    return box, _lobes_fraction(box, canvas, center, lobes, grow_mm)


def _paint_hard_negative(canvas: SliceCanvas, hn: HardNegative, anat: Anatomy) -> None:
    if hn.center_mm is None:
        return  # osteoporosis is part of the anatomy (densities, cortex, texture)
    x, y, z = hn.center_mm
    if hn.kind == "bone_island":
        hit = _union_slab_fraction(canvas, hn.center_mm, ((0.0, 0.0, 0.0, hn.size_mm / 2.0),))
        if hit is not None:
            box, frac = hit
            canvas.replace_bone(box, frac, hn.hu, stays_bone=True)
        return
    v = next(v for v in anat.vertebrae if v.name == hn.vertebra)
    if hn.kind == "schmorl_node":
        # Disc herniated through the endplate: disc-density content with a sclerotic rim.
        r = hn.size_mm / 2.0
        for radius, value, stays_bone in ((r + 1.3, anat.cortical_hu + 250.0, True), (r, DISC_HU, False)):
            hit = _union_slab_fraction(canvas, hn.center_mm, ((0.0, 0.0, 0.0, radius),))
            if hit is not None:
                canvas.replace_bone(hit[0], hit[1], value, stays_bone)
    elif hn.kind == "basivertebral_vein":
        # A Y-shaped venous channel from the body centre through the posterior cortex.
        half_height = 1.5 * hn.size_mm
        f = canvas.zfrac(z - half_height, z + half_height)
        if not f:
            return
        r = hn.size_mm / 2.0
        hub = (x, v.y_center + 0.1 * v.half_depth)
        segments = (
            (hub, (x, v.y_center + v.half_depth + 1.5)),
            (hub, (x - 0.35 * v.half_width, v.y_center - 0.35 * v.half_depth)),
            (hub, (x + 0.35 * v.half_width, v.y_center - 0.35 * v.half_depth)),
        )
        for (ax, ay), (bx, by) in segments:
            hit = capsule(canvas, ax, ay, bx, by, r)
            if hit is not None:
                box, cov = hit
                canvas.replace_bone(box, cov * f, hn.hu, stays_bone=False)
    elif hn.kind == "osteophyte":
        # A bony spur pointing outwards from the endplate rim, tapering away from the endplate.
        toward_disc = 1.0 if z >= v.z_mid else -1.0
        taper = 1.0 - min(abs(canvas.z - (z + toward_disc * 1.5)) / 5.0, 1.0)
        if taper <= 0.0:
            return
        angle = math.atan2(y - v.y_center, x)
        length = hn.size_mm * taper
        cx, cy = x + math.cos(angle) * (0.5 * length - 1.0), y + math.sin(angle) * (0.5 * length - 1.0)
        hit = ellipse(canvas, cx, cy, 0.5 * length + 1.0, 1.2 + 1.8 * taper, angle)
        if hit is not None:
            box, cov = hit
            canvas.paint_bone(box, cov, anat.cortical_hu + 100.0, BONE_KINDS["vertebra"])


def _paint_lesion(canvas: SliceCanvas, lesion: Lesion, anat: Anatomy, lesion_mask: np.ndarray) -> None:
    shell_mm = 0.8 if lesion.bone == "rib" else 0.0
    hit = _union_slab_fraction(canvas, lesion.center_mm, lesion.lobes, grow_mm=shell_mm)
    if hit is None:
        return
    box, frac = hit
    if shell_mm:
        # Expansile rib lesion: the rib bulges, keeping a thin bony shell around the lesion.
        bone = canvas.bone[box.rows, box.cols]
        canvas.paint_bone(box, frac * (1.0 - bone), 0.7 * anat.dense_cortical_hu, BONE_KINDS["rib"])
        frac = _lobes_fraction(box, canvas, lesion.center_mm, lesion.lobes)
    # The lesion replaces bone (trabecular and cortex) where it overlaps bone; sharp margin.
    canvas.replace_bone(box, frac, lesion.hu, stays_bone=False)
    lesion_mask[box.rows, box.cols] |= (frac >= 0.5) & (canvas.bone[box.rows, box.cols] >= 0.5)


def slice_labels(lesions, z_mm: np.ndarray, thickness: float) -> np.ndarray:
    """1 if a lesion centre is within 0.75 radius of the slab centre, -1 if a lesion only grazes the slab."""
    labels = np.zeros(len(z_mm), dtype=np.int8)
    for les in lesions:
        r = les.diameter_mm / 2.0
        dz = np.abs(np.asarray(z_mm) - les.center_mm[2])
        touches = dz < r + thickness / 2.0
        clear = dz <= 0.75 * r
        labels[touches & (labels == 0)] = -1
        labels[clear] = 1
    return labels


def render_study(spec: StudySpec) -> PhantomStudy:
    """Render a study: ideal slabs (anatomy, findings), then the scanner (blur, noise, offset)."""
    anat = spec.anatomy
    sc = spec.scanner
    rng = np.random.default_rng([spec.seed, spec.index, 0x52454E])
    texture = _TrabecularTexture(rng, anat.texture_mm)
    z_mm = spec.z_mm
    x0, y0 = spec.origin_xy_mm
    shape = (MATRIX, MATRIX)
    volume = np.empty((spec.n_slices, *shape), dtype=np.float32)
    bone_mask = np.empty((spec.n_slices, *shape), dtype=bool)
    lesion_mask = np.zeros((spec.n_slices, *shape), dtype=bool)
    xs = (x0 + sc.pixel_spacing_mm * np.arange(MATRIX)).astype(np.float32)
    ys = (y0 + sc.pixel_spacing_mm * np.arange(MATRIX)).astype(np.float32)
    for k, z in enumerate(z_mm):
        canvas = SliceCanvas.blank(
            x0,
            y0,
            sc.pixel_spacing_mm,
            shape,
            float(z),
            sc.slice_thickness_mm,
            AIR_HU,
            texture=texture.plane(float(z), xs, ys),
        )
        paint_slice(canvas, anat)
        for hn in spec.hard_negatives:
            _paint_hard_negative(canvas, hn, anat)
        for les in spec.lesions:
            _paint_lesion(canvas, les, anat, lesion_mask[k])
        volume[k] = canvas.hu
        bone_mask[k] = canvas.bone >= 0.5
    apply_scanner(
        volume,
        rng,
        spacing_mm=sc.pixel_spacing_mm,
        psf_sigma_mm=sc.psf_sigma_mm,
        edge_enhance=sc.edge_enhance,
        noise_sigma_hu=sc.noise_sigma_hu,
        noise_low_freq=sc.noise_low_freq,
        noise_anisotropy=sc.noise_anisotropy,
        hu_offset=sc.hu_offset,
        bone_hu_scale=sc.bone_hu_scale,
    )
    return PhantomStudy(
        spec=spec,
        hu=volume,
        z_mm=np.asarray(z_mm, dtype=np.float64),
        pixel_spacing_mm=sc.pixel_spacing_mm,
        origin_xy_mm=(x0, y0),
        lesion_mask=lesion_mask,
        bone_mask=bone_mask,
        slice_labels=slice_labels(spec.lesions, z_mm, sc.slice_thickness_mm),
    )
