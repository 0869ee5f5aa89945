"""Small synthetic CT series and analysis results for the forwarding tests (no model needed).

``write_ct_series`` writes a valid CT Image Storage series (Explicit VR Little Endian) with a
recognisable patient identity and returns the ``Series`` ingest would hand over;
``make_study_result`` builds a ``StudyResult`` with one finding and heatmaps for its key slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from app.domain import Finding, ModelRef, Series, SliceResult, StudyResult

PATIENT_NAME = "Quillfeather^Zephyrine^Q"  # not in dicognito's name lists: a random pseudonym cannot contain it
PATIENT_ID = "PID-0042-ORIG"
BIRTH_DATE = "19480317"
ACCESSION = "ACC-778899"
INSTITUTION = "St Example Hospital"
MODEL = ModelRef(name="myeloma-mobilenet25d", version="1.2.0", sha256="ab" * 32, variant="pqat_int8")


def _phantom(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Soft tissue disc with a bright vertebra-like block and a dark 'lytic' hole in the middle slices."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    body = ((yy - c) ** 2 + (xx - c) ** 2) < (0.45 * size) ** 2
    bone = (abs(yy - c * 1.2) < size * 0.12) & (abs(xx - c) < size * 0.15)
    volume = np.full((n, size, size), -1000, np.int16)
    for k in range(n):
        img = np.where(body, 40, -1000).astype(np.float32)
        img[bone] = 250
        if n // 3 <= k < 2 * n // 3:
            hole = ((yy - c * 1.2) ** 2 + (xx - c) ** 2) < (size * 0.05) ** 2
            img[hole] = 45
        img += rng.normal(0, 20, img.shape) * body
        volume[k] = np.clip(img, -1024, 3000).astype(np.int16)
    return volume


def write_ct_series(folder: Path, n_slices: int = 10, size: int = 64, seed: int = 0,
                    thickness_mm: float = 2.0, spacing_mm: float = 0.8) -> Series:
    """Write ``n_slices`` CT files into ``folder`` and return the matching ``Series``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = (generate_uid() for _ in range(3))
    hu = _phantom(n_slices, size, rng)
    origin = (-size * spacing_mm / 2, -size * spacing_mm / 2)
    files, sop_uids, z = [], [], []
    for k in range(n_slices):
        sop_uid = generate_uid()
        zk = -100.0 + k * thickness_mm
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240506"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
        ds.AccessionNumber = ACCESSION
        ds.Modality = "CT"
        ds.Manufacturer = "Synthetic"
        ds.InstitutionName = INSTITUTION
        ds.ReferringPhysicianName = "Ref^Doctor"
        ds.StudyDescription = "CT whole body low dose"
        ds.SeriesDescription = "Bone 2.0"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = BIRTH_DATE
        ds.PatientSex = "F"
        ds.PatientAge = "076Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = thickness_mm
        ds.KVP = 120
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID = "S1"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], zk]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = zk
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [spacing_mm, spacing_mm]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 400, 1800
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = hu[k].tobytes()
        path = folder / f"ct_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sop_uids.append(sop_uid)
        z.append(zk)
    return Series(study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uids=sop_uids,
                  z_mm=np.array(z), hu=hu, pixel_spacing_mm=(spacing_mm, spacing_mm),
                  slice_thickness_mm=thickness_mm, files=files, series_description="Bone 2.0",
                  patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                  image_position_first=(origin[0], origin[1], z[0]))


def make_study_result(series: Series, positive: bool = True) -> StudyResult:
    """A plausible result: a bump of probability around the middle, one finding, heatmaps on key slices."""
    n, rows, cols = series.hu.shape
    centre = n // 2
    probs = [float(0.9 * np.exp(-((i - centre) / 2.0) ** 2)) if positive else 0.05 for i in range(n)]
    slices = [SliceResult(uid, float(z), p) for uid, z, p in zip(series.sop_instance_uids, series.z_mm, probs, strict=True)]
    result = StudyResult(study_instance_uid=series.study_instance_uid,
                         series_instance_uid=series.series_instance_uid,
                         probability=max(probs), positive=positive, threshold=0.5, model=MODEL,
                         slices=slices, findings=[])
    yy, xx = np.mgrid[:rows, :cols]
    centre_px = (int(rows * 0.6), cols // 2)
    for i in result.key_slices(3):
        result.heatmaps[i] = np.exp(-((yy - centre_px[0]) ** 2 + (xx - centre_px[1]) ** 2) / (2 * 4.0**2))
    if positive:
        result.findings.append(Finding(
            slice_start=centre - 1, slice_end=centre + 1,
            z_start_mm=float(series.z_mm[centre - 1]), z_end_mm=float(series.z_mm[centre + 1]),
            peak_slice=centre, peak_sop_instance_uid=series.sop_instance_uids[centre],
            peak_probability=probs[centre], center_px=centre_px,
            bbox_px=(centre_px[0] - 5, centre_px[1] - 5, centre_px[0] + 5, centre_px[1] + 5)))
    return result
