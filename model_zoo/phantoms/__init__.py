"""Synthetic whole-body low-dose CT phantoms with myeloma lytic lesions and their mimics.

numpy + scipy (+ pydicom for UIDs and files) only, so the TensorFlow-free app can use it.
"""

from .dicom_writer import write_study_dicom
from .generator import (
    GENERATOR_VERSION,
    HARD_NEGATIVE_KINDS,
    HardNegative,
    Lesion,
    PhantomStudy,
    ScannerParams,
    StudySpec,
    render_study,
    sample_study_spec,
    slice_labels,
)

__all__ = [
    "GENERATOR_VERSION",
    "HARD_NEGATIVE_KINDS",
    "HardNegative",
    "Lesion",
    "PhantomStudy",
    "ScannerParams",
    "StudySpec",
    "render_study",
    "sample_study_spec",
    "slice_labels",
    "write_study_dicom",
]
