"""The images of one case on the server, fetched lazily (WADO-RS) and cached for the session.

``list_case_images`` makes one QIDO-RS query: the CT slices of the analysed series in instance
order, and the AI key images (Secondary Capture). ``InstanceCache`` fetches an instance the
first time it is shown and keeps the file in a private temporary folder, removed when the cache
is closed or garbage-collected (the end of the browser session); nothing is fetched twice.
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, SecondaryCaptureImageStorage

from app.dicomweb import DicomWebClient
from app.domain import AppError

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS, INSTANCE_NUMBER = (
    "0020000D", "0020000E", "00080018", "00080016", "00200013")
CT_CLASSES = {CTImageStorage, EnhancedCTImageStorage}
ARRAYS_IN_MEMORY = 16  # decoded slices kept for quick slider moves


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int


@dataclass(frozen=True)
class CaseImages:
    slices: tuple[InstanceRef, ...]  # the CT series, in instance order
    key_images: tuple[InstanceRef, ...]  # AI key images (Secondary Capture)

    def index_of(self, sop_instance_uid: str) -> int | None:
        return next((i for i, ref in enumerate(self.slices) if ref.sop_instance_uid == sop_instance_uid), None)


def _ref(item: dict) -> InstanceRef:
    def value(tag: str, default=""):
        return (item.get(tag, {}).get("Value") or [default])[0]

    return InstanceRef(str(value(STUDY_UID)), str(value(SERIES_UID)), str(value(SOP_UID)), str(value(SOP_CLASS)),
                       int(value(INSTANCE_NUMBER, 0) or 0))


def _order(refs: Iterable[InstanceRef]) -> tuple[InstanceRef, ...]:
    return tuple(sorted(refs, key=lambda r: (r.instance_number, r.sop_instance_uid)))


def list_case_images(client: DicomWebClient, study_uid: str, analysed: Iterable[str] = ()) -> CaseImages:
    """The case's CT series (the one holding the ``analysed`` SOP Instance UIDs, e.g. the AI key slices,
    else the largest) and its key images."""
    refs = [_ref(item) for item in client.search_instances(study_uid, includefield=INSTANCE_NUMBER)]
    by_series: dict[str, list[InstanceRef]] = {}
    for ref in refs:
        if ref.sop_class_uid in CT_CLASSES:
            by_series.setdefault(ref.series_uid, []).append(ref)
    if not by_series:
        raise AppError("the server holds no CT images for this case (yet); refresh the worklist later")
    wanted = set(analysed)
    preferred = [s for s, slices in by_series.items() if any(r.sop_instance_uid in wanted for r in slices)]
    series = preferred[0] if preferred else max(by_series, key=lambda s: len(by_series[s]))
    key_images = [r for r in refs if r.sop_class_uid == SecondaryCaptureImageStorage]
    return CaseImages(slices=_order(by_series[series]), key_images=_order(key_images))


def hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    """A CT slice in HU (float32)."""
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


class InstanceCache:
    """Instances fetched on first use, kept on local disk for the session."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="telerad-case-")
        self._cleanup = weakref.finalize(self, self._folder.cleanup)
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self.fetched = 0  # instances fetched from the server (the rest came from the cache)

    def close(self) -> None:
        self._cleanup()
        self._arrays.clear()

    def _path(self, ref: InstanceRef) -> Path:
        return Path(self._folder.name) / f"{ref.sop_instance_uid}.dcm"

    def dataset(self, client: DicomWebClient, ref: InstanceRef) -> pydicom.Dataset:
        path = self._path(ref)
        if not path.is_file():
            ds = client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_instance_uid)
            if str(ds.SOPInstanceUID) != ref.sop_instance_uid:
                raise AppError("the server returned another image than the one asked for")
            partial = path.with_suffix(".partial")
            ds.save_as(partial, enforce_file_format=True)
            partial.replace(path)
            self.fetched += 1
        return pydicom.dcmread(path)

    def header(self, client: DicomWebClient, ref: InstanceRef) -> pydicom.Dataset:
        ds = self.dataset(client, ref)
        if "PixelData" in ds:
            del ds.PixelData
        return ds

    def pixels(self, client: DicomWebClient, ref: InstanceRef) -> np.ndarray:
        """HU for a CT slice, the stored pixels (e.g. RGB) otherwise; decoded arrays are kept briefly."""
        key = ref.sop_instance_uid
        if key not in self._arrays:
            ds = self.dataset(client, ref)
            self._arrays[key] = hounsfield(ds) if ref.sop_class_uid in CT_CLASSES else ds.pixel_array
            while len(self._arrays) > ARRAYS_IN_MEMORY:
                self._arrays.popitem(last=False)
        self._arrays.move_to_end(key)
        return self._arrays[key]

    def is_cached(self, ref: InstanceRef) -> bool:
        return self._path(ref).is_file()
