"""DICOM ingest: user inputs -> one analysable axial CT ``Series`` per study, in HU.

The steps, in order:

1. discovery (``app.archive``): folders, zip archives and single files become a
   list of regular files; unsafe archive members and outside symlinks are refused;
2. headers: every file is read with ``stop_before_pixels`` (bounded memory) and
   checked: DICOM at all, CT Image Storage, sane image size, geometry present;
3. grouping by study and series, then per series: localizer images dropped,
   one orientation / size / pixel spacing / patient, axial, sorted by position
   along the slice normal (``ImagePositionPatient . normal``, never by
   InstanceNumber or file name), duplicate positions dropped, gaps and uneven
   spacing warned about (or the series rejected when the hole is too long);
4. choice: per study the analysable series with thin slices, then the sharpest
   (bone) kernel, then the thinnest slices, then the most slices;
5. pixels: only the chosen series is decoded, straight into one int16 HU array,
   with RescaleSlope / RescaleIntercept applied per slice. Uncompressed pixels
   are read at the offset the header pass found (no second header parse; 16-bit
   little-endian values straight into the array); JPEG / JPEG-LS / JPEG 2000 /
   RLE go through pydicom and its pylibjpeg / pyjpegls plugins, after the
   codestream's own image size is checked.

``ingest`` does all five steps. ``plan_ingest`` stops after step 4 and returns one
``PendingSeries`` per study, which decodes step 5 later: all at once (``load``) or
chunk by chunk (``decode_chunks``), so the analysis can start on the first slices
while later files are still being read.

Slices with uneven spacing are kept as acquired (their SOP Instance UIDs stay
valid for results); ``model_zoo.contract.stack_25d`` interpolates along
``z_mm``, so no slices are invented here. Slice numbers in warnings count from 1
along the sorted series.

Bad input never raises: every file or series that cannot be used becomes an
``InputError`` in ``IngestResult.errors`` (or, when it is merely not chosen, in
``IngestResult.skipped``). Messages carry no patient data; pydicom's own
warnings (which may quote element values) are silenced while ingesting.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
    RLELossless,
)

from app.archive import (
    IngestLimits,
    InputError,
    InputFile,
    discover_inputs,
    format_bytes,
    is_zip,
    other_archive_kind,
)
from app.domain import AppError, Series

__all__ = ["DEFAULT_LIMITS", "IngestError", "IngestLimits", "IngestPlan", "IngestResult", "InputError", "PendingSeries",
           "ingest", "kernel_sharpness", "plan_ingest"]

log = logging.getLogger(__name__)

THIN_SLICE_MM = 2.5  # at most this thick counts as "thin" when choosing a series
GAP_FACTOR = 1.5  # a step this many times the usual spacing is a gap
DUPLICATE_TOL_MM = 0.05  # positions closer than this are the same slice
ORIENTATION_TOL = 1e-3  # direction cosines that agree within this are the same orientation
MAX_TILT_DEG = 30.0  # normal further from the patient axis than this is not axial
TILT_WARN_DEG = 1.0
MAX_LISTED_GAPS = 3
_HEAD_BYTES = 4096  # covers the preamble and file meta group
_DEFER_BYTES = 64 * 1024  # larger header values are not loaded (bounded memory)
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little, big endian
_I16 = np.iinfo(np.int16)
PADDING_HU = -1000  # pixels outside the scanned field (PixelPaddingValue) become air
_UNEXPECTED = "could not be read (unexpected content); check that it is a valid CT image"
DEFAULT_LIMITS = IngestLimits()


class IngestError(AppError):
    """A file that cannot be used; the message completes "<path>: ..." for the user."""


class _Rejected(Exception):
    """A series that cannot be analysed; the message says why."""


@dataclass
class IngestResult:
    series: list[Series]  # one per study: the chosen analysable series
    errors: list[InputError]  # inputs that could not be used
    skipped: list[InputError]  # informational: series not chosen, localizers, index files


@dataclass(frozen=True, slots=True)
class _Header:
    """What grouping and choosing need from one CT image; no pixels."""

    file: InputFile
    transfer_syntax: str
    pixel_offset: int  # where the Pixel Data element starts
    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int | None
    series_description: str
    kernel: str
    localizer: bool
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    slope: float
    intercept: float
    rescale_missing: bool
    padding: tuple[int, int] | None  # stored values marking pixels outside the scanned field (inclusive range)
    patient_id: str
    patient_name: str


@dataclass
class _Candidate:
    """An analysable series: sorted, de-duplicated headers and their positions."""

    headers: list[_Header]
    z_mm: np.ndarray
    warnings: list[str]  # orientation, duplicates, rescale; spacing warnings come after decoding
    notes: list[str]  # informational, for ``skipped``

    @property
    def first(self) -> _Header:
        return self.headers[0]

    @property
    def thickness_mm(self) -> float:
        if self.first.slice_thickness or len(self.z_mm) < 2:
            return self.first.slice_thickness or 0.0
        return float(np.median(np.diff(self.z_mm)))

    @property
    def rank(self) -> tuple:
        """Higher is better: thin, sharper kernel, thinner, more slices; the UID keeps ties stable."""
        thin = self.thickness_mm <= THIN_SLICE_MM
        return (thin, kernel_sharpness(self.first.kernel), -round(self.thickness_mm, 2),
                len(self.headers), self.first.series_uid)


@dataclass
class _Progress:
    callback: Callable[[int, int], None] | None
    total: int
    done: int = 0

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


def ingest(inputs: Sequence[str | os.PathLike], workdir: Path, limits: IngestLimits = DEFAULT_LIMITS,
           progress: Callable[[int, int], None] | None = None) -> IngestResult:
    """Read DICOM folders, zip archives and files; return one chosen CT series per study.

    ``workdir`` is a temporary folder the caller owns: archives are extracted
    there and nowhere else. ``progress(done, total)`` is called after each file;
    ``total`` is first an estimate (every file read twice) and becomes exact once
    the series to decode are known. Never raises for bad input.
    """
    plan = _plan(inputs, workdir, limits, _Progress(progress, total=0), decode_progress=True)
    for pending in plan.studies:
        series = pending.load()
        if series is not None:
            plan.result.series.append(series)
    log.info("ingest: %d series chosen, %d errors, %d skipped",
             len(plan.result.series), len(plan.result.errors), len(plan.result.skipped))
    return plan.result


def plan_ingest(inputs: Sequence[str | os.PathLike], workdir: Path, limits: IngestLimits = DEFAULT_LIMITS,
                progress: Callable[[int, int], None] | None = None) -> IngestPlan:
    """The header pass of ``ingest``: find, check, group, sort and choose; decode no pixels.

    Each ``IngestPlan.studies`` entry decodes its study's series when asked
    (``PendingSeries.load``, or chunk by chunk with ``decode_chunks``), so a caller
    can start analysing the first slices while later files are still being read.
    ``progress(done, total)`` is called after each file's header. Never raises for bad input.
    """
    return _plan(inputs, workdir, limits, _Progress(progress, total=0), decode_progress=False)


def _plan(inputs: Sequence[str | os.PathLike], workdir: Path, limits: IngestLimits, ticker: _Progress,
          decode_progress: bool) -> IngestPlan:
    """Discovery, headers and series choice. With ``decode_progress`` the ticker's total
    counts every file twice (headers, then pixels) and decoding ticks it too."""
    if isinstance(inputs, str | os.PathLike):  # one path, not a sequence of characters
        inputs = [inputs]
    with _quiet_pydicom():
        found = discover_inputs(inputs, Path(workdir), limits)
        result = IngestResult(series=[], errors=list(found.errors), skipped=[])
        ticker.total = (2 if decode_progress else 1) * len(found.files)
        headers = _read_headers(found.files, limits, result, ticker)
        grouped: dict[str, dict[str, list[_Header]]] = defaultdict(lambda: defaultdict(list))
        for h in headers:
            grouped[h.study_uid][h.series_uid].append(h)
        studies = [_rank_study(series, limits, result) for series in grouped.values()]
    if decode_progress:
        ticker.total = ticker.done + sum(len(s.candidates[0].headers) for s in studies if s.candidates)
    else:
        ticker = _Progress(None, total=0)
    return IngestPlan(studies=[PendingSeries(study, limits, result, ticker) for study in studies], result=result)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns about odd element values by quoting them: keep patient data out of logs."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# --- headers -------------------------------------------------------------------------------------

def _read_headers(files: list[InputFile], limits: IngestLimits, result: IngestResult,
                  ticker: _Progress) -> list[_Header]:
    headers = []
    for item in files:
        try:
            headers.append(_read_header(item, limits))
        except _NotAnImageFile as exc:
            result.skipped.append(InputError(item.display, str(exc)))
        except IngestError as exc:
            result.errors.append(InputError(item.display, str(exc)))
        except Exception as exc:  # one odd file must not stop the others
            result.errors.append(InputError(item.display, _UNEXPECTED))
            log.debug("unexpected %s reading a header", type(exc).__name__, exc_info=True)
        ticker.tick()
    return headers


class _NotAnImageFile(IngestError):
    """A file that is expected next to images (DICOMDIR): reported as skipped, not as an error."""


def _read_header(item: InputFile, limits: IngestLimits) -> _Header:
    """Read and check one file's header (no pixels); raises IngestError with the reason."""
    try:
        with open(item.path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size > limits.max_file_bytes:
                raise IngestError(f"is {format_bytes(size)}, too large for one CT image "
                                  f"(limit {format_bytes(limits.max_file_bytes)})")
            head = fp.read(_HEAD_BYTES)
            has_preamble = head[128:132] == b"DICM"
            if not has_preamble and not _looks_like_bare_dataset(head):
                raise IngestError(_not_dicom_reason(head))
            if has_preamble and DeflatedExplicitVRLittleEndian.encode() in head:
                raise IngestError("uses the Deflated transfer syntax, which is not read here; "
                                  "re-export the images uncompressed or JPEG-compressed")
            fp.seek(0)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble, defer_size=_DEFER_BYTES)
            except Exception:  # pydicom raises many types for damaged input
                raise IngestError("is truncated or damaged: its DICOM header cannot be read") from None
            pixel_offset = fp.tell()  # pydicom stops in front of the Pixel Data element
            has_pixels = fp.read(4) in _PIXEL_DATA_TAGS
    except OSError as exc:
        raise IngestError(f"cannot be read ({exc.strerror or 'I/O error'})") from None
    return _header_from(ds, item, limits, pixel_offset if has_pixels else None)


def _looks_like_bare_dataset(head: bytes) -> bool:
    """A DICOM dataset without preamble and file meta starts with a group 0x0002 or 0x0008 tag."""
    if len(head) < 8:
        return False
    group = struct.unpack("<H", head[:2])[0]
    return group in (0x0002, 0x0008)


def _not_dicom_reason(head: bytes) -> str:
    if is_zip(head):
        return "is a zip archive inside a zip archive; not opened - extract the outer archive first"
    kind = other_archive_kind(head)
    if kind:
        return f"is a {kind} archive; only zip archives are opened - extract it first"
    return "is not a DICOM file"


def _check_is_ct_image(sop_class: str, modality: str, has_pixels: bool) -> None:
    if sop_class == MediaStorageDirectoryStorage:
        raise _NotAnImageFile("is a DICOMDIR index file; the images it lists are read directly")
    if sop_class in (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage):
        raise IngestError("is an Enhanced CT multi-frame image, which is not supported; "
                          "export the series as classic CT images (one file per slice)")
    sop_name = UID(sop_class).name if sop_class else ""
    if sop_class and sop_name == sop_class and not has_pixels:  # an unknown class is often a cut-off UID
        raise IngestError("is truncated or damaged: its header is incomplete")
    if sop_class and "Image Storage" not in sop_name:
        kind = f"'{sop_name}'" if sop_name != sop_class else f"SOP class {sop_class}"
        raise IngestError(f"is not an image but a {kind} object (modality {modality or 'unknown'})")
    if modality != "CT":
        raise IngestError(f"is {modality or 'of unknown modality'}, not CT; only CT series can be analysed")
    if sop_class and sop_class != CTImageStorage:
        raise IngestError(f"is a '{sop_name}', not a CT image (CT Image Storage)")
    if not has_pixels:
        raise IngestError("has no pixel data (the file is truncated or not an image)")


def _header_from(ds: Dataset, item: InputFile, limits: IngestLimits, pixel_offset: int | None) -> _Header:
    """The checked header; ``pixel_offset`` is None when the file has no Pixel Data element."""
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = _ascii(ds, "SOPClassUID") or str(meta.get("MediaStorageSOPClassUID", "") or "")
    _check_is_ct_image(sop_class, _ascii(ds, "Modality"), pixel_offset is not None)
    attr = "image pixel description"
    try:
        rows, cols, bits = _us(ds, "Rows"), _us(ds, "Columns"), _us(ds, "BitsAllocated")
        frames = int(_ascii(ds, "NumberOfFrames") or 1)
        samples = _us(ds, "SamplesPerPixel", default=1)
        photometric = _ascii(ds, "PhotometricInterpretation")
        _check_pixel_description(rows, cols, bits, frames, samples, photometric, limits)
        bits_stored = _us(ds, "BitsStored", default=bits)
        if not 1 <= bits_stored <= bits:
            raise ValueError("BitsStored")
        signed = _us(ds, "PixelRepresentation", default=0) == 1
        attr = "ImageOrientationPatient"
        orientation = _numbers(ds, attr, 6)
        _check_orientation(orientation)
        attr = "ImagePositionPatient"
        position = _numbers(ds, attr, 3)
        attr = "PixelSpacing"
        spacing = _numbers(ds, attr, 2)
        if min(spacing) <= 0:
            raise ValueError(attr)
        attr = "RescaleSlope"
        slope_text, intercept_text = _ascii(ds, "RescaleSlope"), _ascii(ds, "RescaleIntercept")
        slope = float(slope_text) if slope_text else 1.0
        attr = "RescaleIntercept"
        intercept = float(intercept_text) if intercept_text else 0.0
        if slope == 0 or not math.isfinite(slope) or not math.isfinite(intercept):
            raise ValueError("rescale")
        attr = "PixelPaddingValue"
        padding = _padding_range(ds, bits, signed)
        attr = "StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID"
        study_uid, series_uid = _ascii(ds, "StudyInstanceUID"), _ascii(ds, "SeriesInstanceUID")
        sop_uid = _ascii(ds, "SOPInstanceUID")
        if not (study_uid and series_uid and sop_uid):
            raise ValueError(attr)
    except IngestError:
        raise
    except Exception:  # missing or malformed values
        raise IngestError(f"has a missing or invalid {attr}; it cannot be placed in a CT volume") from None
    syntax = str(meta.get("TransferSyntaxUID") or "") or _implied_syntax(ds)
    _decoder(syntax)
    thickness = _optional_number(ds, "SliceThickness")
    series_number = _optional_number(ds, "SeriesNumber")
    return _Header(
        file=item,
        transfer_syntax=syntax,
        pixel_offset=pixel_offset,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=int(series_number) if series_number is not None else None,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        kernel=_text(ds.get("ConvolutionKernel", "")),
        localizer="LOCALIZER" in (v.upper() for v in _ascii_values(ds, "ImageType")),
        orientation=orientation,
        position=(position[0], position[1], position[2]),
        rows=rows,
        cols=cols,
        bits_allocated=bits,
        bits_stored=bits_stored,
        signed=signed,
        photometric=photometric or "MONOCHROME2",
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=thickness if thickness and thickness > 0 else None,
        slope=slope,
        intercept=intercept,
        rescale_missing=not (slope_text and intercept_text),
        padding=padding,
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
    )


def _padding_range(ds: Dataset, bits_allocated: int, signed: bool) -> tuple[int, int] | None:
    """(low, high) stored values of padding pixels (PixelPaddingValue [, PixelPaddingRangeLimit]), or None.

    Both are stored values of the pixels' own representation, whatever VR a writer gave
    them: -2000 written as SS in unsigned data means 63536.
    """
    def stored(value: int) -> int:
        value %= 1 << bits_allocated
        return value - (1 << bits_allocated) if signed and value >= 1 << (bits_allocated - 1) else value

    elem = ds.get_item(_TAGS["PixelPaddingValue"])
    if elem is None or elem.value in (None, b""):
        return None
    low = _us(ds, "PixelPaddingValue")  # a raw "US or SS" (implicit VR) reads as unsigned; stored() fixes the sign
    high = _us(ds, "PixelPaddingRangeLimit", default=low)
    first, last = sorted((stored(low), stored(high)))
    return first, last


def _check_pixel_description(rows: int, cols: int, bits: int, frames: int, samples: int, photometric: str,
                             limits: IngestLimits) -> None:
    """Refuse impossible or enormous images from the header alone, before any pixel is decoded."""
    claimed = rows * cols * frames * samples * bits // 8
    if rows > limits.max_rows or cols > limits.max_cols or frames != 1 or rows < 1 or cols < 1:
        raise IngestError(f"claims {rows} x {cols} pixels x {frames} frame(s) x {bits} bits "
                          f"({format_bytes(claimed)}); a CT slice is one frame of at most "
                          f"{limits.max_rows} x {limits.max_cols}")
    if bits not in (8, 16):
        raise IngestError(f"has {bits} bits per pixel; CT images have 16 (or 8)")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise IngestError(f"is a colour image ({photometric}), not a grey-scale CT slice")


def _check_orientation(iop: tuple[float, ...]) -> None:
    row, col = np.array(iop[:3]), np.array(iop[3:])
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        raise ValueError("not orthonormal")


# The header pass reads thousands of files: values of these ASCII VRs (CS, DS, IS, UI, US) are
# decoded here from the raw element, skipping pydicom's per-value conversion, the slow part.
_TAGS = {keyword: tag_for_keyword(keyword) for keyword in (
    "SOPClassUID", "Modality", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "ImageOrientationPatient",
    "ImagePositionPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "SliceThickness", "SeriesNumber", "ImageType", "PixelPaddingValue",
    "PixelPaddingRangeLimit")}


def _ascii_values(ds: Dataset, keyword: str) -> list[str]:
    elem = ds.get_item(_TAGS[keyword])
    value = None if elem is None else elem.value
    if value is None or value == b"" or value == "":
        return []
    if isinstance(value, bytes):
        return [part.strip(" \x00") for part in value.decode("ascii", "replace").split("\\")]
    return [str(v) for v in _values(value)]


def _ascii(ds: Dataset, keyword: str) -> str:
    values = _ascii_values(ds, keyword)
    return values[0] if values else ""


def _us(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An unsigned short (US) value; raises ValueError when missing without default or malformed."""
    elem = ds.get_item(_TAGS[keyword])
    if elem is None or elem.value in (None, b""):
        if default is None:
            raise ValueError(f"{keyword} missing")
        return default
    if isinstance(elem.value, bytes):
        if len(elem.value) != 2:
            raise ValueError(f"{keyword} malformed")
        return struct.unpack("<H" if elem.is_little_endian else ">H", elem.value)[0]
    return int(elem.value)


def _numbers(ds: Dataset, keyword: str, n: int) -> tuple[float, ...]:
    out = tuple(float(v) for v in _ascii_values(ds, keyword))
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"expected {n} numbers")
    return out


def _optional_number(ds: Dataset, keyword: str) -> float | None:
    """An optional numeric attribute; missing or malformed reads as None."""
    try:
        value = float(_ascii(ds, keyword))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _values(value: object) -> list:
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _text(value: object) -> str:
    return "\\".join(str(v) for v in _values(value) if str(v)) if value not in (None, "") else ""


def _implied_syntax(ds: Dataset) -> str:
    """Transfer syntax of a dataset read without file meta, from how pydicom parsed it."""
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if not little:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


_SIEMENS_KERNEL = re.compile(r"^[BHIQ][A-Z]?(\d{2})")


def kernel_sharpness(kernel: str) -> int:
    """2 for a bone kernel, 1 for another sharp kernel (lung, edge), 0 for soft or unknown.

    Knows GE names (BONE, BONEPLUS, LUNG, EDGE) and Siemens codes (B60f, Br64,
    Hr68: the number is the sharpness, >= 60 bone, 50-59 sharp). Other vendors'
    codes count as unknown.
    """
    first = kernel.split("\\")[0].strip().upper()
    if "BONE" in first:
        return 2
    if any(word in first for word in ("LUNG", "EDGE", "SHARP", "DETAIL")):
        return 1
    siemens = _SIEMENS_KERNEL.match(first)
    if siemens:
        number = int(siemens.group(1))
        return 2 if number >= 60 else 1 if number >= 50 else 0
    return 0


# --- series choice -------------------------------------------------------------------------------

@dataclass
class _Study:
    headers: list[_Header]  # every CT image of the study
    candidates: list[_Candidate]  # analysable series, best first
    rejected: list[str]  # why the other series cannot be analysed


def _rank_study(series: dict[str, list[_Header]], limits: IngestLimits, result: IngestResult) -> _Study:
    study = _Study(headers=[h for headers in series.values() for h in headers], candidates=[], rejected=[])
    for headers in series.values():
        label = _series_label(headers[0])
        try:
            candidate = _evaluate_series(headers, limits)
        except _Rejected as exc:
            result.skipped.append(InputError(_where(headers), f"{label}: {exc}"))
            study.rejected.append(f"{label}: {exc}")
            continue
        result.skipped.extend(InputError(_where(headers), f"{label}: {note}") for note in candidate.notes)
        study.candidates.append(candidate)
    study.candidates.sort(key=lambda c: c.rank, reverse=True)
    return study


@dataclass
class IngestPlan:
    """The header pass's findings: one PendingSeries per study, in input order.

    ``result`` collects the errors and skipped inputs, now and while the studies
    are decoded; its ``series`` list is only filled by ``ingest``.
    """

    studies: list[PendingSeries]
    result: IngestResult


class PendingSeries:
    """The analysable series of one study, best first, before any pixel is decoded.

    ``load()`` decodes the best series - falling back to the next one when too many
    of its files cannot be decoded - and returns it, or None when the study has no
    analysable series (the reasons go to the plan's result). Call it once.

    Streaming: ``open()`` returns the best series with its pixel array allocated but
    not yet filled and ``decode_chunks`` fills it in slice order, so a consumer can
    work on the first slices while later files are read. ``load()`` afterwards
    returns that same Series object when every slice was readable, else a new one.
    One thread at a time.
    """

    def __init__(self, study: _Study, limits: IngestLimits, result: IngestResult, ticker: _Progress):
        self._study = study
        self._limits = limits
        self._result = result
        self._ticker = ticker
        self._decoding: _Decoding | None = None
        self.series: Series | None = None  # the series handed out last, by open() or load()

    @property
    def n_slices(self) -> int:
        """Slices of the best series (0 when there is none)."""
        return len(self._study.candidates[0].headers) if self._study.candidates else 0

    def open(self) -> Series | None:
        """The best series, its ``hu`` being filled by ``decode_chunks``; None when the study has none."""
        if not self._study.candidates:
            return None
        self.series = self._first().complete
        self.series.selection_reason = _selection_reason(self._study.candidates[0], self._study.candidates[1:])
        return self.series

    def decode_chunks(self, size: int) -> Iterator[np.ndarray]:
        """Decode the best series ``size`` slices at a time; yield each chunk of its ``hu`` once filled.

        A slice that cannot be decoded is recorded as an error and holds zeros; ``load()``
        then drops it (and returns a Series other than ``open()``'s).
        """
        decoding = self._first()
        n = len(decoding.hu)
        for start in range(0, n, size):
            stop = min(start + size, n)
            decoding.decode(stop)
            yield decoding.hu[start:stop]

    def release(self) -> None:
        """Let go of the decoded pixels (the caller keeps the Series it was handed, if it wants them)."""
        self._decoding = None
        self.series = None

    def load(self) -> Series | None:
        """Decode what is left and return the series to analyse; None when nothing in the study can be."""
        study = self._study
        for i, candidate in enumerate(study.candidates):
            if i:
                self._ticker.total += len(candidate.headers)
            decoding = self._first() if i == 0 else _Decoding(candidate, self._limits, self._result, self._ticker)
            decoding.decode(len(candidate.headers))
            try:
                series = decoding.series(self._limits)
            except _Rejected as exc:
                reason = f"{_describe(candidate)}: {exc}"
                self._result.skipped.append(InputError(_where(candidate.headers), reason))
                study.rejected.append(reason)
                self._decoding = None  # its pixels are not needed any more
                continue
            others = study.candidates[i + 1:]
            series.selection_reason = _selection_reason(candidate, others)
            self._result.skipped.extend(InputError(_where(o.headers), _not_chosen_reason(o, candidate))
                                        for o in others)
            self.series = series
            return series
        reasons = "; ".join(study.rejected)
        self._result.errors.append(InputError(_where(study.headers),
                                              f"no analysable axial CT series in this study ({reasons})"))
        return None

    def _first(self) -> _Decoding:
        if self._decoding is None:
            self._decoding = _Decoding(self._study.candidates[0], self._limits, self._result, self._ticker)
        return self._decoding


def _evaluate_series(headers: list[_Header], limits: IngestLimits) -> _Candidate:
    """Check one series and sort it along the slice normal; raises _Rejected with the reason."""
    notes: list[str] = []
    by_sop: dict[str, _Header] = {}
    for h in headers:
        by_sop.setdefault(h.sop_uid, h)  # the first copy of each image wins
    unique = list(by_sop.values())
    if len(unique) < len(headers):
        notes.append(f"{len(headers) - len(unique)} duplicate copies of the same images ignored")
    images = [h for h in unique if not h.localizer]
    if not images:
        raise _Rejected("localizer (scout) images, not an axial series")
    if len(images) < len(unique):
        notes.append(f"{len(unique) - len(images)} localizer (scout) images ignored")
    first = images[0]
    if len({h.patient_id for h in images}) > 1:
        raise _Rejected("its images carry different patient IDs; mixed patients are never combined")
    if any(max(abs(a - b) for a, b in zip(h.orientation, first.orientation, strict=True)) > ORIENTATION_TOL
           for h in images):
        raise _Rejected("its images have different orientations; they cannot be stacked into one volume")
    sizes = sorted({(h.rows, h.cols) for h in images})
    if len(sizes) > 1:
        raise _Rejected(f"its images have different sizes ({', '.join(f'{r} x {c}' for r, c in sizes)})")
    if any(not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4) for h in images):
        raise _Rejected("its images have different pixel spacings")
    normal = _normal(first.orientation)
    plane = _plane(normal)
    if plane != "axial":
        raise _Rejected(f"{plane} images, not axial")

    positions = np.array([h.position for h in images], dtype=np.float64)
    z = positions @ normal
    order = sorted(range(len(images)), key=lambda i: (z[i], images[i].sop_uid))
    kept = [order[0]]
    for i in order[1:]:
        if z[i] - z[kept[-1]] > DUPLICATE_TOL_MM:
            kept.append(i)
    warnings_ = _orientation_warnings(first.orientation, normal, positions[kept])
    if len(kept) < len(order):
        n = len(order) - len(kept)
        warnings_.append(f"{n} duplicate slice position{'s' if n > 1 else ''} removed")
    sorted_headers = [images[i] for i in kept]
    if any(h.rescale_missing for h in sorted_headers):
        warnings_.append("RescaleSlope/RescaleIntercept missing; stored values were taken as Hounsfield units")
    _check_size(len(sorted_headers), first, limits)
    _spacing_warnings(z[kept], limits)  # rejects holes too long before any pixel is read
    return _Candidate(headers=sorted_headers, z_mm=z[kept], warnings=warnings_, notes=notes)


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    n = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    return n / np.linalg.norm(n)


def _plane(normal: np.ndarray) -> str:
    if abs(normal[2]) >= math.cos(math.radians(MAX_TILT_DEG)):
        return "axial"
    axis = int(np.argmax(np.abs(normal)))
    return "sagittal" if axis == 0 else "coronal" if axis == 1 else "oblique"


def _orientation_warnings(iop: tuple[float, ...], normal: np.ndarray, positions: np.ndarray) -> list[str]:
    out = []
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if tilt > TILT_WARN_DEG:
        out.append(f"images are tilted {tilt:.0f} degrees from axial; the model was trained on axial images")
    if len(positions) > 1:
        step = positions[-1] - positions[0]
        shear = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / max(np.linalg.norm(step), 1e-9))))
        if shear > TILT_WARN_DEG:
            out.append(f"the slice stack is sheared by {shear:.0f} degrees (gantry tilt); "
                       "anatomy shifts between neighbouring slices")
    if iop[0] < 0.9 or iop[4] < math.cos(math.radians(MAX_TILT_DEG)):
        out.append("images are not in the standard supine orientation (patient's left on the image right, "
                   "anterior at the top); results are less reliable")
    return out


def _check_size(n: int, first: _Header, limits: IngestLimits) -> None:
    if n < limits.min_slices:
        raise _Rejected(f"only {n} slice{'s' if n != 1 else ''}; at least {limits.min_slices} are needed")
    if n > limits.max_slices:
        raise _Rejected(f"{n} slices, more than the {limits.max_slices} allowed")
    volume = n * first.rows * first.cols * 2
    if volume > limits.max_volume_bytes:
        raise _Rejected(f"{n} slices of {first.rows} x {first.cols} need {format_bytes(volume)}, more than the "
                        f"{format_bytes(limits.max_volume_bytes)} limit")


def _spacing_warnings(z: np.ndarray, limits: IngestLimits) -> list[str]:
    """Warnings about gaps and uneven spacing of sorted positions; raises _Rejected for holes too long."""
    if len(z) < 2:
        return []
    steps = np.diff(z)
    nominal = float(np.median(steps))
    if nominal > limits.max_slice_spacing_mm:
        raise _Rejected(f"slices are {_mm(nominal)} mm apart; at most {_mm(limits.max_slice_spacing_mm)} mm "
                        "is needed to see 5 mm lesions")
    gaps = np.flatnonzero(steps > GAP_FACTOR * nominal)
    out = []
    for i in gaps:
        where = (f"between slices {i + 1} and {i + 2} (z {_mm(z[i])} and {_mm(z[i + 1])} mm; "
                 f"expected {_mm(nominal)} mm)")
        if steps[i] > limits.max_gap_mm:
            raise _Rejected(f"the series is incomplete: gap of {_mm(steps[i])} mm {where}; "
                            "re-export the complete series")
        if len(out) < MAX_LISTED_GAPS:
            out.append(f"gap of {_mm(steps[i])} mm {where}; results near it are less reliable")
    if len(gaps) > MAX_LISTED_GAPS:
        out.append(f"{len(gaps) - MAX_LISTED_GAPS} more gaps in the slice stack; results are less reliable")
    regular = np.delete(steps, gaps)
    if regular.size and np.any(np.abs(regular - nominal) > max(0.05, 0.1 * nominal)):
        out.append(f"slice spacing is not uniform ({_mm(regular.min())} to {_mm(regular.max())} mm, mostly "
                   f"{_mm(nominal)} mm); slices are interpolated along z")
    return out


def _mm(x: float) -> str:
    text = f"{round(float(x), 2):.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _series_label(h: _Header) -> str:
    number = f"series {h.series_number}" if h.series_number is not None else "series (no number)"
    return f"{number} '{h.series_description}'" if h.series_description else number


def _describe(c: _Candidate) -> str:
    return (f"{_series_label(c.first)} ({_mm(c.thickness_mm)} mm slices, kernel {c.first.kernel or 'unknown'}, "
            f"{len(c.headers)} slices)")


def _virtues(c: _Candidate) -> str:
    parts = ["thin slices" if c.thickness_mm <= THIN_SLICE_MM else "thick slices"]
    parts.append({2: "bone kernel", 1: "sharp kernel", 0: "soft or unknown kernel"}[kernel_sharpness(c.first.kernel)])
    return ", ".join(parts)


def _selection_reason(chosen: _Candidate, others: list[_Candidate]) -> str:
    if not others:
        return f"{_describe(chosen)}: the only analysable axial CT series in the study"
    return (f"{_describe(chosen)} chosen from {len(others) + 1} analysable series ({_virtues(chosen)}); "
            + "; ".join(f"preferred over {_series_label(o.first)} for {_advantage(chosen, o)}" for o in others))


def _not_chosen_reason(other: _Candidate, chosen: _Candidate) -> str:
    return (f"{_describe(other)}: analysable but not chosen; {_series_label(chosen.first)} has "
            f"{_advantage(chosen, other)}")


def _advantage(better: _Candidate, worse: _Candidate) -> str:
    """What made ``better`` rank above ``worse``: the first differing element of the rank."""
    for i, (a, b) in enumerate(zip(better.rank, worse.rank, strict=True)):
        if a != b:
            return ("thin slices", "a sharper (bone) kernel", "thinner slices", "more slices",
                    "the same quality (tie broken by UID)")[i]
    return "the same quality"


def _where(headers: list[_Header]) -> str:
    """The folder (or archive folder) holding these files, for messages about a series or study."""
    shown = [h.file.display for h in headers]
    try:
        common = os.path.commonpath(shown)
    except ValueError:
        return shown[0]
    return common if len(shown) > 1 else shown[0]


# --- pixels --------------------------------------------------------------------------------------

class _Decoding:
    """One candidate series being decoded, slice i into ``hu[i]``, in slice order."""

    def __init__(self, candidate: _Candidate, limits: IngestLimits, result: IngestResult, ticker: _Progress):
        first = candidate.first
        self.candidate = candidate
        self.hu = np.empty((len(candidate.headers), first.rows, first.cols), dtype=np.int16)
        self.failed: list[int] = []
        self.done = 0
        # The series as it is when every slice decodes (``hu`` fills as decoding goes on).
        self.complete = _series(candidate, candidate.headers, candidate.z_mm, self.hu,
                                list(candidate.warnings) + _spacing_warnings(candidate.z_mm, limits))
        self._result = result
        self._ticker = ticker

    def decode(self, stop: int) -> None:
        """Decode the slices up to ``stop``; an unreadable slice becomes an error (and is dropped later)."""
        with _quiet_pydicom():
            for i in range(self.done, min(stop, len(self.hu))):
                h = self.candidate.headers[i]
                try:
                    _decode_into(h, self.hu[i])
                except IngestError as exc:
                    self._failed(i, InputError(h.file.display, str(exc)))
                except Exception as exc:  # one odd file must not stop the others
                    self._failed(i, InputError(h.file.display, _UNEXPECTED))
                    log.debug("unexpected %s decoding pixels", type(exc).__name__, exc_info=True)
                self.done = i + 1
                self._ticker.tick()

    def _failed(self, i: int, error: InputError) -> None:
        self._result.errors.append(error)
        self.failed.append(i)
        self.hu[i] = 0  # a defined value until the slice is dropped

    def series(self, limits: IngestLimits) -> Series:
        """The decoded series without the unreadable slices; raises _Rejected when too few are left."""
        if not self.failed:
            return self.complete
        c = self.candidate
        failed = set(self.failed)
        kept = [i for i in range(len(c.headers)) if i not in failed]
        _check_size(len(kept), c.first, limits)
        for j, i in enumerate(kept):  # close the holes in place: no second volume in memory
            if i != j:
                self.hu[j] = self.hu[i]
        lost = len(self.failed)
        z_mm = c.z_mm[kept]
        warnings_ = list(c.warnings)
        warnings_.append(f"{lost} slice{'s' if lost > 1 else ''} could not be read (see errors)")
        warnings_.extend(_spacing_warnings(z_mm, limits))
        return _series(c, [c.headers[i] for i in kept], z_mm, self.hu[:len(kept)], warnings_)


def _series(c: _Candidate, headers: list[_Header], z_mm: np.ndarray, hu: np.ndarray,
            warnings_: list[str]) -> Series:
    first = c.first
    return Series(
        study_instance_uid=first.study_uid,
        series_instance_uid=first.series_uid,
        sop_instance_uids=[h.sop_uid for h in headers],
        z_mm=z_mm,
        hu=hu,
        pixel_spacing_mm=first.pixel_spacing,
        slice_thickness_mm=first.slice_thickness,
        files=[h.file.path for h in headers],
        series_description=first.series_description,
        convolution_kernel=first.kernel,
        patient_id=first.patient_id,
        patient_name=first.patient_name,
        image_orientation=first.orientation,
        image_position_first=headers[0].position,
        warnings=warnings_,
    )


def _decode_into(h: _Header, out: np.ndarray) -> None:
    """Decode one slice and write it as int16 HU into ``out`` (rows, cols).

    The file is not parsed again: the Pixel Data value is read at the offset the
    header pass found. Little-endian 16-bit uncompressed values (most CT) are read
    straight into ``out``; other encodings go to pydicom's decoder with the header's
    image description (pylibjpeg / pyjpegls plugins for compressed syntaxes).
    """
    try:
        with open(h.file.path, "rb") as fp:
            pixels, padding = _read_pixels(fp, h, _decoder(h.transfer_syntax), out)
    except OSError as exc:
        raise IngestError(f"cannot be read ({exc.strerror or 'I/O error'})") from None
    if pixels.shape != (h.rows, h.cols):
        raise IngestError(f"pixel data has shape {pixels.shape}, expected {h.rows} x {h.cols}")
    _to_hu(pixels, h.slope, h.intercept, out)
    if padding is not None:
        out[padding] = PADDING_HU


def _decoder(transfer_syntax: str) -> Decoder:
    """pydicom's decoder for the syntax; IngestError when there is none (checked in the header pass)."""
    syntax = UID(transfer_syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise IngestError(f"uses transfer syntax '{syntax.name}', which cannot be decoded") from None
    if not decoder.is_available:
        raise IngestError(f"is compressed with '{syntax.name}' and no decoder for it is installed "
                          "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls)")
    return decoder


def _read_pixels(fp: BinaryIO, h: _Header, decoder: Decoder, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored values of one slice (a view of ``out`` when they could be read into it) and
    the mask of its padding pixels (None without PixelPaddingValue)."""
    syntax = decoder.UID
    description = {"rows": h.rows, "columns": h.cols, "samples_per_pixel": 1, "number_of_frames": 1,
                   "bits_allocated": h.bits_allocated, "bits_stored": h.bits_stored,
                   "pixel_representation": int(h.signed), "photometric_interpretation": h.photometric}
    fp.seek(h.pixel_offset)
    length = _seek_pixel_value(fp, big_endian=syntax == ExplicitVRBigEndian)
    try:
        if decoder.is_native:
            needed = h.rows * h.cols * h.bits_allocated // 8
            available = os.fstat(fp.fileno()).st_size - fp.tell()
            if length == _UNDEFINED_LENGTH or min(length, available) < needed:
                raise IngestError("has truncated pixel data")
            if _reads_in_place(syntax, h, out):
                return _read_stored_into(fp, h, out)
            pixels, _ = decoder.as_array(fp, pixel_keyword="PixelData", **description)
        else:
            encapsulated = fp.read()
            frame = _single_frame(encapsulated)
            if syntax != RLELossless:
                _check_codestream(frame, h)
            pixels, _ = decoder.as_array(encapsulated, **description)
    except IngestError:
        raise
    except Exception:  # decoders raise many types for damaged data
        raise IngestError(f"has truncated or damaged pixel data ({syntax.name})") from None
    return pixels, _padding_mask(pixels, h)


def _padding_mask(stored: np.ndarray, h: _Header) -> np.ndarray | None:
    if h.padding is None:
        return None
    low, high = h.padding
    return (stored == low) if low == high else ((stored >= low) & (stored <= high))


def _reads_in_place(syntax: UID, h: _Header, out: np.ndarray) -> bool:
    """Whether the stored values are the bytes of ``out`` as they are: 16-bit little endian on a
    little-endian machine."""
    return (syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and h.bits_allocated == 16
            and sys.byteorder == "little" and out.dtype == np.int16 and out.flags.c_contiguous)


def _read_stored_into(fp: BinaryIO, h: _Header, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Read 16-bit stored values into ``out``'s memory, without a temporary array; and the padding mask.

    Bits above BitsStored are corrected as pydicom does: shifted out and back, which
    clears them for unsigned values and sign-extends signed ones. The padding mask is
    taken before, since a padding value may lie outside the BitsStored range (-3024 in 12 bits).
    """
    stored = out.view(np.int16 if h.signed else np.uint16)
    if fp.readinto(memoryview(stored).cast("B")) != stored.nbytes:
        raise IngestError("has truncated pixel data")
    padding = _padding_mask(stored, h)
    unused = h.bits_allocated - h.bits_stored
    if unused:
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)
    return stored, padding


_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_VRS = (b"OB", b"OW", b"UN")


def _seek_pixel_value(fp: BinaryIO, big_endian: bool) -> int:
    """Move ``fp`` from the start of the Pixel Data element to its value; return the value length."""
    element = fp.read(8)
    if len(element) < 8 or element[:4] != _PIXEL_DATA_TAGS[big_endian]:
        raise IngestError("has no pixel data (the file is truncated or not an image)")
    order = ">" if big_endian else "<"
    # The element says itself whether it is explicit VR (some files contradict their transfer syntax).
    if element[4:6] in _PIXEL_VRS and element[6:8] == b"\x00\x00":
        length = fp.read(4)
        if len(length) < 4:
            raise IngestError("has truncated pixel data")
        return struct.unpack(order + "I", length)[0]
    return struct.unpack(order + "I", element[4:8])[0]


def _single_frame(encapsulated: bytes) -> bytes:
    """The one frame of encapsulated pixel data, after checking that no item is cut off.

    Decoders often decode a truncated codestream without complaint, so
    completeness is checked here: items up to the sequence delimiter.
    """
    fragments = []
    at = 0
    while True:
        if at + 8 > len(encapsulated):
            raise IngestError("has truncated pixel data (compressed data cut off)")
        tag, length = encapsulated[at:at + 4], struct.unpack("<I", encapsulated[at + 4:at + 8])[0]
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            raise IngestError("has damaged compressed pixel data")
        if at + 8 + length > len(encapsulated):
            raise IngestError("has truncated pixel data (compressed data cut off)")
        if at:  # the first item is the basic offset table
            fragments.append(encapsulated[at + 8:at + 8 + length])
        at += 8 + length
    if not fragments:
        raise IngestError("has damaged compressed pixel data (no frame)")
    return b"".join(fragments)


_ITEM, _SEQUENCE_DELIMITER = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def _check_codestream(frame: bytes, h: _Header) -> None:
    """Compare the size a JPEG-family codestream declares with the header before a decoder allocates it."""
    shape = _codestream_shape(frame)
    if shape is None:
        raise IngestError("has damaged compressed pixel data (no image size in the codestream)")
    if shape != (h.rows, h.cols):
        raise IngestError(f"compressed image claims {shape[0]} x {shape[1]} pixels but the header says "
                          f"{h.rows} x {h.cols}; not decoded")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _codestream_shape(frame: bytes) -> tuple[int, int] | None:
    """(rows, cols) declared by a JPEG, JPEG-LS or JPEG 2000 codestream, None if not found."""
    if frame[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(frame) and frame[i] == 0xFF:
            marker = frame[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                rows, cols = struct.unpack(">HH", frame[i + 5:i + 9])
                return rows, cols
            i += 2 + struct.unpack(">H", frame[i + 2:i + 4])[0]
        return None
    at = frame.find(b"\xff\x4f\xff\x51", 0, 65536)  # J2K: SOC then SIZ (also inside a JP2 wrapper)
    if at < 0 or len(frame) < at + 24:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[at + 8:at + 24])
    return ysiz - y0, xsiz - x0


def _to_hu(pixels: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """HU = stored * slope + intercept, rounded and clipped to int16, written into ``out``.

    ``pixels`` may be modified. The usual CT case (16-bit, slope 1, integer intercept)
    needs no temporary array.
    """
    if not pixels.dtype.isnative:  # big endian data: the 16-bit view below needs native byte order
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    if slope == 1.0 and float(intercept).is_integer() and pixels.dtype.itemsize == 2:
        shift = int(intercept)
        info = np.iinfo(pixels.dtype)
        low, high = max(_I16.min - shift, info.min), min(_I16.max - shift, info.max)
        if low <= high:  # else the intercept is absurd: the general path below clips
            if pixels.min() < low or pixels.max() > high:
                if not pixels.flags.writeable:
                    pixels = pixels.copy()
                np.clip(pixels, low, high, out=pixels)
            # Modular 16-bit addition is exact here because every result lies inside int16.
            np.add(pixels.view(np.uint16), np.uint16(shift % 65536), out=out.view(np.uint16))
            return
    hu = pixels.astype(np.float32)
    hu *= np.float32(slope)
    hu += np.float32(intercept)
    np.rint(hu, out=hu)
    np.clip(hu, _I16.min, _I16.max, out=hu)
    out[...] = hu
