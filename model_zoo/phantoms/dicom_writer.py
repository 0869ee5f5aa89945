"""Write a rendered phantom study as a CT Image Storage series (one file per slice).

Explicit VR Little Endian; every Type 1 and Type 2 attribute of the CT Image IOD
modules (Patient, General Study, Patient Study, General Series, Frame of
Reference, General Equipment, General Image, Image Plane, Image Pixel, CT Image,
VOI LUT, SOP Common). Pixels are stored as unsigned 16-bit ``HU + 1024``
(RescaleIntercept -1024, RescaleSlope 1, 12 bits stored: HU -1024 .. 3071).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from .generator import PhantomStudy, covered_levels

RESCALE_INTERCEPT = -1024
_BITS_STORED = 12
_INSTITUTION = "Synthetic Phantom Hospital"


def slice_uid(series_uid: str, index: int) -> str:
    """SOP Instance UID of slice ``index`` (deterministic from the series UID)."""
    return generate_uid(entropy_srcs=[series_uid, "slice", str(index)])


def body_part(study: PhantomStudy) -> str:
    """DICOM BodyPartExamined defined term for the covered z range."""
    levels = covered_levels(study.spec)
    chest = any(name.startswith("T") and int(name[1:]) <= 10 for name in levels)
    abdomen = any(name.startswith("L") or name in ("T11", "T12") for name in levels)
    pelvis = study.z_mm[0] < study.spec.anatomy.sacrum_top
    if chest and abdomen:
        return "CHESTABDPELVIS" if pelvis else "CHESTABDOMEN"
    if pelvis and abdomen:
        return "ABDOMENPELVIS"
    if chest:
        return "CHEST"
    return "PELVIS" if pelvis else "ABDOMEN"


def stored_pixels(hu: np.ndarray) -> np.ndarray:
    """HU -> stored uint16 values (rounded, clipped to the 12-bit range)."""
    stored = np.rint(np.asarray(hu, dtype=np.float32) - RESCALE_INTERCEPT)
    return np.clip(stored, 0, 2**_BITS_STORED - 1).astype(np.uint16)


def _series_dataset(study: PhantomStudy) -> Dataset:
    """Attributes shared by every slice of the series."""
    spec = study.spec
    sc = spec.scanner
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    # Patient + Patient Study
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.IssuerOfPatientID = "PHANTOM"
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age:03d}Y"
    # General Study
    ds.StudyInstanceUID = spec.study_instance_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.ReferringPhysicianName = "Referrer^Synthetic"
    ds.StudyID = f"{spec.index + 1}"
    ds.AccessionNumber = spec.accession_number
    ds.StudyDescription = "CT WHOLE BODY LOW DOSE"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = spec.series_instance_uid
    ds.SeriesNumber = 2
    ds.SeriesDate = spec.study_date
    ds.SeriesTime = spec.study_time
    ds.SeriesDescription = f"WB LOW DOSE {sc.slice_thickness_mm:g}mm {sc.kernel}"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = body_part(study)
    # Frame of Reference
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = sc.manufacturer
    ds.ManufacturerModelName = sc.model_name
    ds.InstitutionName = _INSTITUTION
    ds.StationName = "CT01"
    ds.SoftwareVersions = "model_zoo.phantoms"
    # General Image / acquisition
    ds.ContentDate = spec.study_date
    ds.ContentTime = spec.study_time
    ds.AcquisitionDate = spec.study_date
    ds.AcquisitionTime = spec.study_time
    ds.AcquisitionNumber = 1
    # Image Plane (per-slice position added later)
    ds.PixelSpacing = [f"{sc.pixel_spacing_mm:g}", f"{sc.pixel_spacing_mm:g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = f"{sc.slice_thickness_mm:g}"
    ds.SpacingBetweenSlices = f"{sc.slice_spacing_mm:g}"
    # Image Pixel
    rows, cols = study.hu.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    # CT Image
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = f"{sc.kvp:g}"
    ds.ConvolutionKernel = sc.kernel_name
    ds.ReconstructionDiameter = f"{sc.pixel_spacing_mm * cols:.2f}"
    ds.DataCollectionDiameter = "500"
    # VOI LUT: bone window first, soft tissue second.
    ds.WindowCenter = [500, 40]
    ds.WindowWidth = [1800, 400]
    ds.WindowCenterWidthExplanation = ["BONE", "SOFT TISSUE"]
    return ds


def write_study_dicom(study: PhantomStudy, out_dir: Path) -> list[Path]:
    """Write one CT file per slice (0001.dcm, 0002.dcm, ... from inferior to superior)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _series_dataset(study)
    x0, y0 = study.origin_xy_mm
    pixels = stored_pixels(study.hu)
    paths = []
    for k, z in enumerate(study.z_mm):
        ds = Dataset()
        ds.update(base)
        uid = slice_uid(study.spec.series_instance_uid, k)
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.3f}", f"{y0:.3f}", f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        ds.PixelData = pixels[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "PHANTOMS_1"
        ds.file_meta = meta
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
