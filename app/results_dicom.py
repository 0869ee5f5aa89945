"""DICOM result objects for one analysed series (IHE AI Results style), built with highdicom.

``build_results`` returns:
- a Comprehensive 3D SR whose root is a TID 1500 Measurement Report: the study-level finding
  (lytic bone lesion present/absent) with the probability and the decision threshold, image
  references to the key slices, one planar ROI (SCOORD polyline on the peak slice) per finding,
  the algorithm (name, version, model sha256) as device observer, algorithm identification
  and Contributing Equipment; VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY;
- Secondary Capture key images (RGB): bone window with the heatmap blended on top.

Both new series are in the analysed study and say in their description that they are AI
output, not for diagnostic use. The objects carry the original identity; de-identification
(``app.deid``) remaps all of them together so the references stay valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
import numpy as np
import pydicom
from matplotlib import colormaps
from pydicom.filebase import DicomBytesIO
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.domain import AppError, Finding, ModelRef, Series, StudyResult

log = logging.getLogger(__name__)

MANUFACTURER = "myeloma-ct"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
SR_SERIES_DESCRIPTION = "AI RESULT - NOT FOR DIAGNOSTIC USE"
SC_SERIES_DESCRIPTION = "AI HEATMAP KEY IMAGES - NOT FOR DIAGNOSTIC USE"
BONE_WINDOW = (400.0, 1800.0)  # level, width (HU)
HEATMAP_OPACITY = 0.5
HEATMAP_FLOOR = 0.2  # heat below this stays transparent so bone detail remains visible

# No standard code exists for "lytic bone lesion" as an AI finding: a private scheme (99...).
CODING_SCHEME = "99MYCT"
LYTIC_BONE_LESION = hd.sr.CodedConcept("LYTLES", CODING_SCHEME, "Lytic bone lesion")
PROBABILITY = codes.DCM.Probability
THRESHOLD = codes.DCM.ThresholdValue
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent


def _software_version() -> str:
    try:
        return metadata.version(MANUFACTURER)
    except metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass
class ResultObjects:
    """The SR and the key images of one case, with the original identity, exactly as they will be
    written (read back from their encoding: values are strings, as de-identification expects)."""

    sr: pydicom.Dataset
    key_images: list[pydicom.Dataset]

    @property
    def datasets(self) -> list[pydicom.Dataset]:
        return [self.sr, *self.key_images]


# --- pictures ------------------------------------------------------------------------
def overlay_rgb(hu_slice: np.ndarray, heatmap: np.ndarray | None,
                window: tuple[float, float] = BONE_WINDOW) -> np.ndarray:
    """Bone-windowed slice with the [0, 1] heatmap blended in (jet colours): uint8 (rows, cols, 3)."""
    level, width = window
    gray = np.clip((hu_slice.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if heatmap is not None:
        if heatmap.shape != hu_slice.shape:
            raise ValueError(f"heatmap shape {heatmap.shape} does not match the slice {hu_slice.shape}")
        heat = np.clip(heatmap.astype(np.float32), 0.0, 1.0)
        colour = colormaps["jet"](heat)[..., :3].astype(np.float32)
        alpha = (HEATMAP_OPACITY * np.clip((heat - HEATMAP_FLOOR) / (1 - HEATMAP_FLOOR), 0, 1))[..., None]
        rgb = (1 - alpha) * rgb + alpha * colour
    return np.round(rgb * 255).astype(np.uint8)


def _orientation_letter(direction: np.ndarray) -> str:
    """Patient orientation code (e.g. 'L', 'P', 'LP') of a direction cosine vector."""
    letters = ""
    for axis in np.argsort(-np.abs(direction)):
        if abs(direction[axis]) > 0.25:
            letters += ("LPH"[axis] if direction[axis] > 0 else "RAF"[axis])
    return letters[:3] or "L"


# --- headers of the referenced slices ------------------------------------------------
def _source_headers(series: Series, indices: list[int]) -> dict[int, pydicom.Dataset]:
    """Headers (no pixels) of the slices ``indices``, checked against the analysed series."""
    if len(series.files) != series.n_slices:
        raise AppError("the series has no file list matching its slices; it cannot be forwarded")
    headers = {}
    for i in sorted(set(indices)):
        ds = pydicom.dcmread(series.files[i], stop_before_pixels=True, force=True)  # ingest takes meta-less files
        _to_supported_character_set(ds)
        if ds.SOPInstanceUID != series.sop_instance_uids[i]:
            raise AppError(f"file {series.files[i].name} is not slice {i} of the analysed series "
                           "(its SOP Instance UID differs)")
        # Patient and study attributes that are Type 2 in the result objects: highdicom copies
        # them from the evidence, and some scanners omit them.
        for keyword in _PATIENT_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, None)
        headers[i] = ds
    return headers


# Single-byte character sets highdicom takes as they are; any other source text is re-encoded as UTF-8.
_KEPT_CHARACTER_SETS = frozenset(v.value for v in hd.enum.SpecificCharacterSetValues if v.value.startswith("ISO_IR"))


def _to_supported_character_set(ds: pydicom.Dataset) -> None:
    """Make the header copy's text UTF-8 unless highdicom takes its character set as it is.

    highdicom refuses code extensions with an empty first value (the usual Japanese "\\ISO 2022 IR 87"),
    Korean ISO 2022 IR 149 and "ISO_IR 6"; decoding with the source's own character set and writing
    UTF-8 keeps every name exact.
    """
    value = ds.get("SpecificCharacterSet")
    values = [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)] if value else []
    if not values or (len(values) == 1 and values[0] in _KEPT_CHARACTER_SETS):
        return
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _model_equipment(model: ModelRef) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:64], software_versions=[model.version[:64], _software_version()],
        device_serial_number=model.sha256[:64],
        contribution_description=f"AI lytic bone lesion detection ({model.name} {model.version} "
                                 f"{model.variant}); not for diagnostic use"[:1024])


# --- Secondary Capture key images ------------------------------------------------------
def build_key_images(series: Series, result: StudyResult, slices: list[int],
                     headers: dict[int, pydicom.Dataset]) -> list[pydicom.Dataset]:
    images = []
    series_uid = generate_uid()
    orientation = np.asarray(series.image_orientation, float)
    patient_orientation = (_orientation_letter(orientation[:3]), _orientation_letter(orientation[3:]))
    for number, i in enumerate(slices, start=1):
        ref = headers[i]
        pixels = overlay_rgb(series.hu[i], result.heatmaps.get(i))
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=number, manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) for v in series.pixel_spacing_mm),
            patient_orientation=patient_orientation,
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            contributing_equipment=[_model_equipment(result.model)])
        sc.SeriesDescription = SC_SERIES_DESCRIPTION
        sc.BurnedInAnnotation = "NO"
        if ref.get("BodyPartExamined"):
            sc.BodyPartExamined = ref.BodyPartExamined
        else:
            sc.Laterality = ""  # unknown body part: laterality unknown (Type 2C)
        sc.ImageComments = (f"AI heatmap over bone window, slice {i + 1} of {series.n_slices}, "
                            f"probability {result.slices[i].probability:.3f}; not for diagnostic use")
        sc.DerivationDescription = "Bone window W1800/L400 with AI heatmap (jet) blended at up to 50% opacity"
        source = pydicom.Dataset()
        source.ReferencedSOPClassUID = ref.SOPClassUID
        source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        sc.SourceImageSequence = [source]
        images.append(sc)
    return images


# --- Comprehensive 3D SR ----------------------------------------------------------------
def _algorithm(model: ModelRef) -> hd.sr.AlgorithmIdentification:
    parameters = [f"sha256={model.sha256}"] + ([f"variant={model.variant}"] if model.variant else [])
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters)


def _finding_group(number: int, finding: Finding, header: pydicom.Dataset, model: ModelRef) -> (
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
    # bbox_px is inclusive pixel indices; SCOORD (column, row) puts 0,0 at the top-left corner of the
    # top-left pixel, so the box's outline runs along the outer edges of its border pixels.
    row0, col0, row1, col1 = finding.bbox_px
    left, top, right, bottom = col0, row0, col1 + 1, row1 + 1
    corners = np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=float)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners,
        source_image=hd.sr.SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Lytic lesion {number}"),
        referenced_region=region, finding_type=codes.SCT.Lesion, algorithm_id=_algorithm(model),
        finding_sites=[hd.sr.FindingSite(codes.SCT.BoneStructure)],
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(finding.peak_probability), unit=UNITLESS)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(LYTIC_BONE_LESION, PRESENT)])


def build_sr(result: StudyResult, key_slices: list[int], headers: dict[int, pydicom.Dataset]) -> pydicom.Dataset:
    """The SR; ``headers`` holds the referenced slices (key slices and finding peaks) by index."""
    model = result.model
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[model.sha256]), name=f"{model.name} {model.version}"[:64],
            manufacturer_name=MANUFACTURER, model_name=model.name[:64], serial_number=model.sha256))
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Study-level result"),
        finding_type=codes.SCT.Lesion, algorithm_id=_algorithm(model),
        finding_sites=[hd.sr.FindingSite(codes.SCT.BoneStructure)],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(result.probability), unit=UNITLESS),
            hd.sr.Measurement(name=THRESHOLD, value=float(result.threshold), unit=UNITLESS),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(LYTIC_BONE_LESION,
                                                             PRESENT if result.positive else ABSENT)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(headers[i].SOPClassUID, headers[i].SOPInstanceUID)
                       for i in key_slices])
    finding_groups = [_finding_group(n, f, headers[f.peak_slice], model)
                      for n, f in enumerate(result.findings, start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[study_group, *finding_groups])
    evidence = [headers[i] for i in sorted(headers)]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        contributing_equipment=[_model_equipment(model)])
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    return sr


def coding_scheme_identification() -> pydicom.Dataset:
    """The Coding Scheme Identification item that declares the private scheme of this app's SRs."""
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "myeloma-ct AI findings"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    return scheme


def build_results(series: Series, result: StudyResult, n_key_slices: int = 3) -> ResultObjects:
    """The SR and key images for ``result``, an analysis of ``series``.

    The SR refers to the ``n_key_slices`` most suspicious slices (and, per finding, its peak slice);
    a key image is made of each of those slices, most suspicious first.
    """
    if result.series_instance_uid != series.series_instance_uid or len(result.slices) != series.n_slices:
        raise AppError("the analysis result does not belong to this series")
    key_slices = result.key_slices(n_key_slices)
    peaks = [f.peak_slice for f in result.findings if f.peak_slice not in key_slices]
    pictured = key_slices + list(dict.fromkeys(peaks))
    headers = _source_headers(series, pictured)
    key_images = build_key_images(series, result, pictured, headers)
    sr = build_sr(result, key_slices, headers)
    log.info("built SR and %d key image(s) for the series", len(key_images))
    return ResultObjects(sr=_as_stored(sr), key_images=[_as_stored(image) for image in key_images])


def _as_stored(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(DicomBytesIO(buffer.getvalue()))
