"""Small DICOM files of every kind for the ingest and hostile-input tests.

``write_series(folder, CTSeriesSpec(...))`` writes one CT series (64 x 64 pixels by
default) with any geometry, pixel encoding and transfer syntax, and returns what
ingest should make of it. Instance numbers and file names are shuffled against
the slice positions on purpose. Other helpers build non-CT objects and raw zip
archives with hand-chosen member names.

Encoders: RLE, JPEG-LS and JPEG 2000 come from pydicom's ``Dataset.compress``
(pydicom / pyjpegls / pylibjpeg-openjpeg). No installed package encodes JPEG
Lossless or JPEG Baseline for DICOM, so JPEG Lossless SV1 is encoded by the small
encoder below and JPEG Baseline by Pillow's JPEG writer. JPEG Extended (12-bit
lossy) has no encoder here and is not covered.

``dciodvfy_report`` / ``dciodvfy_errors`` run dicom3tools' validator on a written
file (a missing validator fails the test: ``make test`` installs it).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def uid(*parts: object) -> str:
    """A deterministic UID from a description of what it names."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class CTSeriesSpec:
    """One series: geometry, identity, pixel encoding. Defaults give a valid axial CT series."""

    n_slices: int = 10
    rows: int = 64
    cols: int = 64
    pixel_spacing: tuple[float, float] = (0.8, 0.7)
    slice_spacing: float = 2.0
    slice_thickness: float | None = None  # default: the slice spacing
    z0: float = -100.0
    positions: tuple[float, ...] | None = None  # along the normal, acquisition order; overrides z0/spacing
    orientation: tuple[float, ...] = AXIAL
    study: str = "study-1"
    series_number: int = 2
    description: str = "Body 2.0"
    kernel: str = "B30f"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    modality: str = "CT"
    sop_class: str = CTImageStorage
    patient_id: str = "TEST-0001"
    patient_name: str = "Test^Patient"
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_representation: int = 1
    slope: float = 1.0
    intercept: float = -1024.0
    transfer_syntax: str = ExplicitVRLittleEndian
    file_meta: bool = True
    garbage_high_bits: bool = False  # set the unused bits above BitsStored, as some scanners do
    pixel_padding: int | None = None  # PixelPaddingValue, stored in the last row of every slice (outside the FOV)
    pixel_padding_vr: str | None = None  # default: SS for signed pixels, US for unsigned ones
    shuffle: bool = True  # instance numbers and file names do not follow the positions

    @property
    def n(self) -> int:
        return len(self.positions) if self.positions is not None else self.n_slices

    @property
    def study_uid(self) -> str:
        return uid("study", self.study)

    @property
    def series_uid(self) -> str:
        return uid("series", self.study, self.series_number, self.description)

    def sop_uid(self, i: int) -> str:
        return uid("sop", self.study, self.series_number, self.description, i)

    def distances(self) -> np.ndarray:
        if self.positions is not None:
            return np.asarray(self.positions, dtype=np.float64)
        return self.z0 + self.slice_spacing * np.arange(self.n_slices)

    def stored_range(self) -> tuple[int, int]:
        if self.pixel_representation:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


@dataclass
class WrittenSeries:
    """What was written, and what ingest should return, in ascending position order."""

    spec: CTSeriesSpec
    paths: list[Path]  # in acquisition order (index i = slice i of the spec)
    hu: np.ndarray  # (n, rows, cols) int16, acquisition order
    z_mm: np.ndarray  # acquisition order
    sop_uids: list[str] = field(default_factory=list)

    @property
    def order(self) -> np.ndarray:
        return np.argsort(self.z_mm, kind="stable")

    @property
    def sorted_hu(self) -> np.ndarray:
        return self.hu[self.order]

    @property
    def sorted_z(self) -> np.ndarray:
        return self.z_mm[self.order]

    @property
    def sorted_sops(self) -> list[str]:
        return [self.sop_uids[i] for i in self.order]


def expected_hu(spec: CTSeriesSpec) -> np.ndarray:
    """A distinct HU image per slice, with the extremes the encoding can store in two corner pixels."""
    n, rows, cols = spec.n, spec.rows, spec.cols
    r, c = np.mgrid[:rows, :cols]
    pattern = ((r * 3 + c * 5) % 200).astype(np.float64)
    hu = -1000.0 + 30.0 * np.arange(n)[:, None, None] + pattern[None]
    low, high = spec.stored_range()
    hu[:, 0, 0] = low * spec.slope + spec.intercept
    hu[:, 0, 1] = high * spec.slope + spec.intercept
    stored = np.clip(np.rint((hu - spec.intercept) / spec.slope), low, high)
    hu = np.clip(np.rint(stored * spec.slope + spec.intercept), -32768, 32767).astype(np.int16)
    if spec.pixel_padding is not None:
        hu[:, -1, :] = -1000  # padding reads as air
    return hu


def stored_values(hu: np.ndarray, spec: CTSeriesSpec) -> np.ndarray:
    low, high = spec.stored_range()
    stored = np.clip(np.rint((hu.astype(np.float64) - spec.intercept) / spec.slope), low, high)
    if spec.bits_allocated == 8:
        return stored.astype(np.uint8)
    out = stored.astype(np.int16 if spec.pixel_representation else np.uint16)
    if spec.garbage_high_bits and spec.bits_stored < 16:
        garbage = np.uint16((0xFFFF << spec.bits_stored) & 0xFFFF)
        out.view(np.uint16)[...] |= garbage
    if spec.pixel_padding is not None:  # the raw 16 bits, even outside the BitsStored range
        out.view(np.uint16)[-1, :] = spec.pixel_padding % 65536
    return out


def ct_dataset(spec: CTSeriesSpec, i: int, stored: np.ndarray, instance_number: int) -> Dataset:
    """Slice ``i`` of the series as a dataset (native pixel data; see ``encode_pixels``)."""
    row, col = np.array(spec.orientation[:3]), np.array(spec.orientation[3:])
    normal = np.cross(row, col)
    in_plane_origin = -row * spec.cols * spec.pixel_spacing[1] / 2 - col * spec.rows * spec.pixel_spacing[0] / 2
    position = in_plane_origin + spec.distances()[i] * normal
    ds = Dataset()
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = spec.sop_uid(i)
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = uid("frame", spec.study)
    ds.Modality = spec.modality
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.StudyDate = "20240102"
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.description
    ds.InstanceNumber = instance_number
    ds.ImageType = list(spec.image_type)
    ds.ConvolutionKernel = spec.kernel
    ds.ImageOrientationPatient = [float(v) for v in spec.orientation]
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
    ds.SliceThickness = spec.slice_thickness if spec.slice_thickness is not None else spec.slice_spacing
    ds.Rows, ds.Columns = spec.rows, spec.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = spec.bits_allocated
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = spec.pixel_representation
    ds.RescaleSlope = spec.slope
    ds.RescaleIntercept = spec.intercept
    ds.RescaleType = "HU"
    if spec.pixel_padding is not None:
        vr = spec.pixel_padding_vr or ("SS" if spec.pixel_representation else "US")
        value = spec.pixel_padding % 65536
        ds.add_new(0x00280120, vr, value - 65536 if vr == "SS" and value >= 32768 else value)
    ds.PixelData = stored.tobytes()
    return ds


def encode_pixels(ds: Dataset, stored: np.ndarray, syntax: str) -> None:
    """Compress ``ds`` in place into ``syntax`` (native syntaxes leave it unchanged)."""
    syntax = UID(syntax)
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        return
    if not syntax.is_compressed:
        return
    if syntax == JPEGLosslessSV1:
        frame = encode_jpeg_lossless(stored, ds.BitsStored)
    elif syntax == JPEGBaseline8Bit:
        frame = encode_jpeg_baseline(stored)
    else:
        lossy = {JPEG2000: {"j2k_cr": [20]}, JPEGLSNearLossless: {"jls_error": 3}}.get(syntax, {})
        ds.compress(syntax, stored, generate_instance_uid=False, **lossy)
        return
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian, file_meta: bool = True) -> Path:
    """Write ``ds`` as a DICOM file, or as a bare implicit-VR dataset without preamble and file meta."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not file_meta:
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, spec: CTSeriesSpec, seed: int = 0) -> WrittenSeries:
    """Write every slice of ``spec`` into ``folder``; file names and instance numbers are shuffled."""
    rng = np.random.default_rng(seed)
    hu = expected_hu(spec)
    n = spec.n
    numbers = rng.permutation(n) + 1 if spec.shuffle else np.arange(n) + 1
    names = rng.permutation(n) if spec.shuffle else np.arange(n)
    syntax = spec.transfer_syntax if spec.file_meta else ImplicitVRLittleEndian
    paths = []
    for i in range(n):
        stored = stored_values(hu[i], spec)
        ds = ct_dataset(spec, i, stored, int(numbers[i]))
        encode_pixels(ds, stored, syntax)
        paths.append(save(ds, folder / f"IM{names[i]:04d}", syntax, spec.file_meta))
    return WrittenSeries(spec=spec, paths=paths, hu=hu, z_mm=spec.distances(),
                         sop_uids=[spec.sop_uid(i) for i in range(n)])


def read_back_hu(written: WrittenSeries) -> np.ndarray:
    """HU a plain pydicom read gives for the written files (acquisition order); for lossy syntaxes."""
    out = []
    for path in written.paths:
        ds = pydicom.dcmread(path)
        out.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(out)


def non_image_dataset(sop_class: str, modality: str, study: str = "study-1") -> Dataset:
    """A minimal object of a non-image SOP class (structured report, presentation state)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid("non-image", sop_class, study)
    ds.StudyInstanceUID = uid("study", study)
    ds.SeriesInstanceUID = uid("series", study, modality)
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-0001"
    return ds


def dciodvfy_report(path: Path) -> str:
    """What dciodvfy says about ``path``; fails the calling test when the validator is missing."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy is required (Debian package dicom3tools; make debs)", pytrace=False)
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return run.stdout + run.stderr


def dciodvfy_errors(path: Path) -> list[str]:
    """The validator's "Error" lines for ``path``."""
    return [line for line in dciodvfy_report(path).splitlines() if "Error" in line]


def with_changes(spec: CTSeriesSpec, **changes: object) -> CTSeriesSpec:
    return replace(spec, **changes)


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip archive with members named exactly as given (including '../' or absolute names)."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 5)), data, compress_type=compression)
    return path


# --- encoders the environment lacks ---------------------------------------------------------------

def encode_jpeg_lossless(image: np.ndarray, precision: int) -> bytes:
    """JPEG Lossless, first-order prediction (process 14, selection value 1), one grey component.

    Signed data are coded as their two's complement in ``precision`` bits, as DICOM requires.
    One Huffman table gives every difference category (0-16) a 5-bit code.
    """
    x = image.astype(np.int64) & ((1 << precision) - 1)
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first line: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]  # elsewhere: left neighbour (predictor 1)
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff)
    bits = []
    for d in diff.ravel().tolist():
        size = abs(d).bit_length()
        bits.append(format(size, "05b"))
        if 0 < size < 16:
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big") if stream else b""
    data = data.replace(b"\xff", b"\xff\x00")
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    sof = b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision]) + rows.to_bytes(2, "big") \
        + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = b"\xff\xc4" + (3 + 16 + 17).to_bytes(2, "big") + b"\x00" + counts + bytes(range(17))
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + data + b"\xff\xd9"


def encode_jpeg_baseline(image: np.ndarray) -> bytes:
    """JPEG Baseline (8-bit, lossy) by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()
