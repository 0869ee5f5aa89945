"""The AI result SR (TID 1500) and the heatmap key images: content, references, dciodvfy."""

from __future__ import annotations

import copy
import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from app.deid import PseudonymStore, StudyDeidentifier
from app.domain import AppError
from app.results_dicom import (
    LYTIC_BONE_LESION,
    SC_SERIES_DESCRIPTION,
    SR_SERIES_DESCRIPTION,
    build_results,
    overlay_rgb,
)
from tests.dicom_factory import dciodvfy_errors
from tests.forward_helpers import MODEL, make_study_result, write_ct_series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_ct_series(tmp_path_factory.mktemp("ct"), n_slices=10, size=64)


@pytest.fixture(scope="module")
def positive(series):
    result = make_study_result(series, positive=True)
    return result, build_results(series, result)


def _report(sr: pydicom.Dataset) -> hd.sr.MeasurementReport:
    return hd.sr.MeasurementReport.from_sequence([hd.sr.Comprehensive3DSR.from_dataset(sr)])


def test_sr_states_the_study_level_finding_probability_and_threshold(positive):
    result, objects = positive
    sr = objects.sr
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert sr.StudyInstanceUID == result.study_instance_uid
    groups = _report(sr).get_image_measurement_groups()
    assert len(groups) == 1
    study = groups[0]
    evaluations = {e.name.meaning: e.value for e in study.get_qualitative_evaluations()}
    assert evaluations[LYTIC_BONE_LESION.meaning] == codes.SCT.Present
    values = {m.name.meaning: m.value for m in study.get_measurements()}
    assert values[codes.DCM.Probability.meaning] == pytest.approx(result.probability)
    assert values[codes.DCM.ThresholdValue.meaning] == pytest.approx(result.threshold)


def test_sr_references_the_key_slices(series, positive):
    result, objects = positive
    study_group = _report(objects.sr).get_image_measurement_groups()[0]
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in study_group[0].ContentSequence if item.ValueType == "IMAGE"}
    key_slice_uids = {series.sop_instance_uids[i] for i in result.key_slices(3)}
    assert referenced == key_slice_uids
    evidence = {sop.ReferencedSOPInstanceUID
                for study in objects.sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for sop in s.ReferencedSOPSequence}
    peak_uids = {f.peak_sop_instance_uid for f in result.findings}
    assert evidence == key_slice_uids | peak_uids, "the evidence lists exactly the slices the report refers to"


def test_finding_is_a_polyline_region_on_its_peak_slice(series, positive):
    result, objects = positive
    finding = result.findings[0]
    groups = _report(objects.sr).get_planar_roi_measurement_groups()
    assert len(groups) == 1
    region = groups[0].roi
    assert region.value_type == hd.sr.ValueTypeValues.SCOORD and region.GraphicType == "POLYLINE"
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == finding.peak_sop_instance_uid
    points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)  # (column, row), 0,0 = corner of pixel 0,0
    row0, col0, row1, col1 = finding.bbox_px  # inclusive pixel indices
    assert points[:, 0].min() == col0 and points[:, 0].max() == col1 + 1
    assert points[:, 1].min() == row0 and points[:, 1].max() == row1 + 1
    assert (points[0] == points[-1]).all(), "the polyline is closed"
    probability = {m.name.meaning: m.value for m in groups[0].get_measurements()}[codes.DCM.Probability.meaning]
    assert probability == pytest.approx(finding.peak_probability)


def test_algorithm_identity_is_in_observer_context_and_contributing_equipment(positive):
    _, objects = positive
    sr = objects.sr
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "myeloma-ct"]
    assert len(ours) == 1
    assert ours[0].ManufacturerModelName == MODEL.name
    assert ours[0].DeviceSerialNumber == MODEL.sha256
    assert MODEL.version in ours[0].SoftwareVersions
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value
    texts = {str(getattr(item, "TextValue", "")) for item in sr.ContentSequence} | {
        str(getattr(item, "TextValue", "")) for _, item in _walk_content(sr)}
    assert MODEL.sha256 in texts, "the device observer carries the model hash"
    assert MODEL.name in texts and MODEL.version in texts  # algorithm identification (TID 4019)
    assert f"sha256={MODEL.sha256}" in texts


def _walk_content(ds: pydicom.Dataset, depth: int = 0):
    for item in getattr(ds, "ContentSequence", []):
        yield depth, item
        yield from _walk_content(item, depth + 1)


def test_every_finding_peak_gets_a_region_and_a_key_image(series):
    result = make_study_result(series)
    second = dataclasses.replace(result.findings[0], slice_start=1, slice_end=1, peak_slice=1,
                                 peak_sop_instance_uid=series.sop_instance_uids[1], peak_probability=0.6)
    result.slices[1].probability = 0.6  # a smaller second lesion, outside the three most suspicious slices
    result.findings.append(second)
    assert 1 not in result.key_slices(3)
    objects = build_results(series, result)
    assert len(_report(objects.sr).get_planar_roi_measurement_groups()) == 2
    pictured = [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in objects.key_images]
    assert pictured == [series.sop_instance_uids[i] for i in [*result.key_slices(3), 1]]


def test_negative_result_has_absent_finding_and_no_regions(series):
    result = make_study_result(series, positive=False)
    objects = build_results(series, result)
    report = _report(objects.sr)
    assert report.get_planar_roi_measurement_groups() == []
    evaluation = report.get_image_measurement_groups()[0].get_qualitative_evaluations()[0]
    assert evaluation.value == codes.SCT.Absent


def test_key_images_are_rgb_bone_window_with_the_heatmap_blended(series, positive):
    result, objects = positive
    assert len(objects.key_images) == 3
    for sc, index in zip(objects.key_images, result.key_slices(3), strict=True):
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
        assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
        assert sc.StudyInstanceUID == series.study_instance_uid
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == series.sop_instance_uids[index]
        pixels = sc.pixel_array.astype(int)
        assert pixels.shape == (*series.hu.shape[1:], 3)
        expected = overlay_rgb(series.hu[index], result.heatmaps[index])
        assert (pixels == expected).all()
    hot_row, hot_col = result.findings[0].center_px
    image = objects.key_images[0].pixel_array.astype(int)
    assert len({*image[0, 0]}) == 1, "far from the heat the picture stays gray"
    assert len({*image[hot_row, hot_col]}) > 1, "at the hot spot the heatmap colour shows"


def test_overlay_uses_the_bone_window_and_checks_shapes():
    hu = np.array([[-1000, 400, 2000]], dtype=np.int16)
    gray = overlay_rgb(hu, None)
    assert gray[0, :, 0].tolist() == [0, 128, 255]  # W1800/L400: -500 -> black, 400 -> mid, 1300 -> white
    assert (overlay_rgb(hu, np.zeros(hu.shape)) == gray).all(), "zero heat changes nothing"
    with pytest.raises(ValueError, match="shape"):
        overlay_rgb(hu, np.zeros((2, 3)))


def test_result_of_another_series_is_refused(series, tmp_path):
    other = write_ct_series(tmp_path / "other", n_slices=10, seed=1)
    with pytest.raises(AppError, match="does not belong"):
        build_results(series, make_study_result(other))


@pytest.mark.parametrize("deidentified", [False, True], ids=["original", "deidentified"])
def test_every_object_passes_dciodvfy_without_errors(series, positive, tmp_path, deidentified):
    _, objects = positive
    datasets = [copy.deepcopy(ds) for ds in objects.datasets]
    if deidentified:
        with PseudonymStore(tmp_path / "pseudonyms.sqlite") as store:
            deidentify = StudyDeidentifier(store, series.study_instance_uid, series.patient_id)
            datasets = [deidentify(ds, generated=True) for ds in datasets]
    for i, ds in enumerate(datasets):
        path = tmp_path / f"object_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], f"{ds.Modality} object {i} does not validate"


@pytest.mark.parametrize(("charset", "name"), [
    ("ISO_IR 100", "Müller^Jürgen"),
    ("ISO_IR 6", "Smith^John"),  # not a defined term, but common
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),  # Japanese, as most scanners write it
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞"),  # Korean
    ("ISO 2022 IR 100", "Müller^Jürgen"),
    ("ISO_IR 192", "Ψάλτης^Νίκος"),
])
def test_results_are_built_whatever_character_set_the_source_uses(tmp_path, charset, name):
    series = write_ct_series(tmp_path / "ct", n_slices=4, size=64, seed=3)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(path, enforce_file_format=True)
    objects = build_results(series, make_study_result(series, positive=True))
    for ds in objects.datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert str(pydicom.dcmread(path).PatientName) == name


def test_results_are_built_for_files_without_a_file_meta_header(tmp_path):
    series = write_ct_series(tmp_path / "ct", n_slices=4, size=64, seed=4)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.file_meta, ds.preamble = pydicom.dataset.FileMetaDataset(), None  # neither is written
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    build_results(series, make_study_result(series, positive=True))
