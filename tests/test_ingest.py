"""Ingest rules: inputs, sorting, HU, pixel encodings, series choice and slice-spacing checks."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import AXIAL, SAGITTAL, CTSeriesSpec, read_back_hu, with_changes, write_series, write_zip
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import app.ingest
from app.ingest import DEFAULT_LIMITS, IngestLimits, ingest, kernel_sharpness, plan_ingest

LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, ExplicitVRBigEndian]


def run(tmp_path: Path, *inputs: Path, limits: IngestLimits = DEFAULT_LIMITS, progress=None):
    return ingest(list(inputs), tmp_path / "work", limits=limits, progress=progress)


def only_series(result):
    assert result.errors == []
    assert len(result.series) == 1, result.skipped
    return result.series[0]


def assert_matches(series, written) -> None:
    """Slices, positions, UIDs and files all follow the slice positions."""
    np.testing.assert_array_equal(series.hu, written.sorted_hu)
    np.testing.assert_allclose(series.z_mm, written.sorted_z, atol=1e-3)
    assert series.sop_instance_uids == written.sorted_sops
    assert [p.name for p in series.files] == [written.paths[i].name for i in written.order]


# --- inputs and sorting -------------------------------------------------------------------------

def test_nested_folder_is_sorted_by_position_not_instance_number_or_file_name(tmp_path):
    written = write_series(tmp_path / "in" / "patient" / "study", CTSeriesSpec(n_slices=12))
    by_number = sorted(written.paths, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    assert by_number != [written.paths[i] for i in written.order]  # the shuffle makes the test meaningful
    assert sorted(written.paths) != [written.paths[i] for i in written.order]

    series = only_series(run(tmp_path, tmp_path / "in"))

    assert_matches(series, written)
    assert series.hu.dtype == np.int16 and series.hu.shape == (12, 64, 64) and series.hu.flags.c_contiguous
    assert np.all(np.diff(series.z_mm) > 0)
    assert series.warnings == []


def test_sorting_follows_the_slice_normal_not_the_z_coordinate(tmp_path):
    # Rows along +x, columns along -y: the normal points to the feet, so z_mm = -IPP z.
    spec = CTSeriesSpec(orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), positions=(4.0, 0.0, 8.0, 2.0, 6.0, 10.0,
                                                                                 14.0, 12.0))
    written = write_series(tmp_path / "in", spec)
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    ipp_z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in series.files]
    assert np.all(np.diff(ipp_z) < 0)  # sorted along the normal, which is -z here
    assert any("standard supine orientation" in w for w in series.warnings)


def test_series_fields(tmp_path):
    spec = CTSeriesSpec(slice_spacing=1.5, slice_thickness=2.0, kernel="B70f", description="Bone 2.0")
    written = write_series(tmp_path / "in", spec)
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert series.study_instance_uid == spec.study_uid
    assert series.series_instance_uid == spec.series_uid
    assert series.pixel_spacing_mm == (0.8, 0.7)
    assert series.slice_thickness_mm == 2.0
    assert series.convolution_kernel == "B70f"
    assert series.series_description == "Bone 2.0"
    assert (series.patient_id, series.patient_name) == ("TEST-0001", "Test^Patient")
    assert series.image_orientation == AXIAL
    first = pydicom.dcmread(written.paths[written.order[0]], stop_before_pixels=True)
    assert series.image_position_first == tuple(float(v) for v in first.ImagePositionPatient)
    assert "the only analysable axial CT series" in series.selection_reason


def test_single_files_and_several_inputs(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec())
    series = only_series(run(tmp_path, *written.paths[:4], tmp_path / "in"))
    assert_matches(series, written)
    series = only_series(ingest(str(tmp_path / "in"), tmp_path / "work2"))  # one path given as a string
    assert_matches(series, written)


def test_zip_archive_is_extracted_into_the_workdir(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec())
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in written.paths:
            zf.write(path, f"DICOM/{path.name}")
    series = only_series(run(tmp_path, archive))
    np.testing.assert_array_equal(series.hu, written.sorted_hu)
    work = (tmp_path / "work").resolve()
    assert all(f.resolve().is_relative_to(work) and f.is_file() for f in series.files)


def test_windows_and_macos_zips_load_without_spurious_errors(tmp_path):
    """A folder entry ending in a backslash (Windows tools) is a folder, not an empty file that
    blocks every member below it; macOS resource forks and Finder files are passed over quietly."""
    written = write_series(tmp_path / "in", CTSeriesSpec())
    members = {"DICOM\\": b""}
    for path in written.paths:
        members[f"DICOM\\{path.name}"] = path.read_bytes()
        members[f"__MACOSX/DICOM/._{path.name}"] = b"\x00\x05\x16\x07" + bytes(80)
    members["DICOM\\.DS_Store"] = bytes(64)
    result = run(tmp_path, write_zip(tmp_path / "study.zip", members))
    np.testing.assert_array_equal(only_series(result).hu, written.sorted_hu)


def test_zip_member_below_a_file_of_the_same_name_is_reported_as_such(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec())
    members = {"DICOM": b"not a folder"} | {f"DICOM/{p.name}": p.read_bytes() for p in written.paths}
    result = run(tmp_path, write_zip(tmp_path / "study.zip", members))
    clashes = [e.error for e in result.errors if "DICOM/" in e.path]
    assert len(clashes) == len(written.paths)
    assert all(e == "archive member's folder has the name of another member (a file); not extracted" for e in clashes)


def test_mac_clutter_in_a_folder_is_passed_over(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec())
    for path in written.paths:
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (tmp_path / "in" / ".DS_Store").write_bytes(bytes(64))
    (tmp_path / "in" / "__MACOSX").mkdir()
    (tmp_path / "in" / "__MACOSX" / "junk").write_bytes(bytes(64))
    result = run(tmp_path, tmp_path / "in")
    np.testing.assert_array_equal(only_series(result).hu, written.sorted_hu)


def test_progress_reports_every_file_and_ends_complete(tmp_path):
    write_series(tmp_path / "in", CTSeriesSpec())
    calls = []
    run(tmp_path, tmp_path / "in", progress=lambda done, total: calls.append((done, total)))
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and all(d <= t for d, t in calls)
    assert calls[-1] == (20, 20)  # 10 headers + 10 decoded slices


# --- Hounsfield units and pixel encodings -------------------------------------------------------

def test_rescale_slope_and_intercept_are_applied_per_slice(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec(slope=0.5, intercept=-1000.0))
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    assert series.hu[:, 0, 1].max() == round(32767 * 0.5 - 1000)


def test_each_slice_keeps_its_own_rescale(tmp_path):
    """Slices of one series may carry different slope and intercept (some scanners do): none borrows another's."""
    written = write_series(tmp_path / "in", CTSeriesSpec())
    expected = np.empty_like(written.hu)
    for i, path in enumerate(written.paths):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = (0.5, 1.0)[i % 2], -1000.0 - 7.0 * i
        ds.save_as(path)
        expected[i] = np.clip(np.rint(ds.pixel_array * ds.RescaleSlope + ds.RescaleIntercept), -32768, 32767)
    first_slice_rule = np.clip(np.rint(pydicom.dcmread(written.paths[0]).pixel_array * 0.5 - 1000.0), -32768, 32767)
    assert not np.array_equal(expected[1], first_slice_rule)  # the test tells the two rules apart

    series = only_series(run(tmp_path, tmp_path / "in"))

    np.testing.assert_array_equal(series.hu, expected[written.order])


def test_hu_is_clipped_to_int16(tmp_path):
    # Stored -32768 with intercept -1024 is -33792 HU: outside int16, so it must clip, not wrap.
    written = write_series(tmp_path / "in", CTSeriesSpec())
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert np.all(series.hu[:, 0, 0] == -32768)
    assert np.all(series.hu[:, 0, 1] == 32767 - 1024)
    assert_matches(series, written)


@pytest.mark.parametrize("spec", [
    CTSeriesSpec(pixel_representation=0, pixel_padding=63536),  # -2000 as unsigned: +62512 HU unmasked
    CTSeriesSpec(pixel_representation=0, pixel_padding=63536, pixel_padding_vr="SS"),  # written as SS -2000
    CTSeriesSpec(bits_stored=12, pixel_padding=-3024),  # outside the 12-bit range: masked before the bit fix
    CTSeriesSpec(pixel_padding=-2000, transfer_syntax=RLELossless),  # decoded by a plugin
    CTSeriesSpec(pixel_representation=0, pixel_padding=63536, file_meta=False),  # implicit VR: raw "US or SS"
], ids=["unsigned", "vr-mismatch", "signed-12-bit", "rle", "implicit-vr"])
def test_padding_pixels_become_air(tmp_path, spec):
    written = write_series(tmp_path / "in", spec)
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert np.all(series.hu[:, -1, :] == -1000)
    np.testing.assert_array_equal(series.hu, written.sorted_hu)


@pytest.mark.parametrize("pixel_representation", [0, 1], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1,
                                    RLELossless])
def test_bits_stored_12_signed_and_unsigned(tmp_path, pixel_representation, syntax):
    spec = CTSeriesSpec(bits_stored=12, pixel_representation=pixel_representation,
                        intercept=-1024.0 if pixel_representation == 0 else 0.0, transfer_syntax=syntax,
                        garbage_high_bits=syntax == ExplicitVRLittleEndian)
    written = write_series(tmp_path / "in", spec)
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    low, high = spec.stored_range()
    assert series.hu[0, 0, 0] == low + spec.intercept and series.hu[0, 0, 1] == high + spec.intercept


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_decode_exactly(tmp_path, syntax):
    written = write_series(tmp_path / "in", CTSeriesSpec(transfer_syntax=syntax))
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == syntax
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)


@pytest.mark.parametrize("spec", [
    CTSeriesSpec(transfer_syntax=JPEGLSNearLossless, bits_stored=12, pixel_representation=0),
    CTSeriesSpec(transfer_syntax=JPEG2000),
    CTSeriesSpec(transfer_syntax=JPEGBaseline8Bit, bits_allocated=8, bits_stored=8, pixel_representation=0,
                 slope=8.0, intercept=-1024.0),
], ids=["jpeg-ls-near-lossless", "jpeg2000", "jpeg-baseline-8bit"])
def test_lossy_compressed_syntaxes_match_pydicom(tmp_path, spec):
    written = write_series(tmp_path / "in", spec)
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == spec.transfer_syntax
    series = only_series(run(tmp_path, tmp_path / "in"))
    np.testing.assert_array_equal(series.hu, np.clip(np.rint(read_back_hu(written)[written.order]), -32768, 32767))
    assert np.abs(series.hu.astype(int) - written.sorted_hu).mean() < 10


def test_files_without_file_meta_are_read(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec(file_meta=False, bits_stored=12, pixel_representation=0))
    raw = written.paths[0].read_bytes()
    assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)


def test_missing_rescale_is_taken_as_hu_with_a_warning(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec(intercept=0.0))
    for path in written.paths:
        ds = pydicom.dcmread(path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(path)
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    assert any("RescaleSlope/RescaleIntercept missing" in w for w in series.warnings)


# --- series choice ------------------------------------------------------------------------------

def test_thin_bone_kernel_series_is_chosen_and_the_others_are_explained(tmp_path):
    base = CTSeriesSpec(n_slices=12)
    write_series(tmp_path / "in" / "s2", with_changes(base, series_number=2, description="Body 5.0",
                                                      slice_spacing=5.0, kernel="B30f"))
    write_series(tmp_path / "in" / "s3", with_changes(base, series_number=3, description="Body 1.0",
                                                      slice_spacing=1.0, kernel="B30f", n_slices=40))
    bone = write_series(tmp_path / "in" / "s4", with_changes(base, series_number=4, description="Bone 1.0",
                                                             slice_spacing=1.0, kernel="B70f", n_slices=40))
    result = run(tmp_path, tmp_path / "in")
    series = only_series(result)
    assert series.series_instance_uid == bone.spec.series_uid
    assert "series 4 'Bone 1.0'" in series.selection_reason
    assert "bone kernel" in series.selection_reason and "3 analysable series" in series.selection_reason
    not_chosen = {s.error.split(" (")[0]: s.error for s in result.skipped}
    assert set(not_chosen) == {"series 2 'Body 5.0'", "series 3 'Body 1.0'"}
    assert "not chosen; series 4 'Bone 1.0' has a sharper (bone) kernel" in not_chosen["series 3 'Body 1.0'"]
    assert "not chosen; series 4 'Bone 1.0' has thin slices" in not_chosen["series 2 'Body 5.0'"]


def test_thin_soft_kernel_beats_thick_bone_kernel(tmp_path):
    write_series(tmp_path / "in" / "a", CTSeriesSpec(series_number=5, description="Bone 5.0", kernel="BONE",
                                                     slice_spacing=5.0))
    thin = write_series(tmp_path / "in" / "b", CTSeriesSpec(series_number=6, description="Soft 1.25",
                                                            kernel="STANDARD", slice_spacing=1.25, n_slices=30))
    result = run(tmp_path, tmp_path / "in")
    assert only_series(result).series_instance_uid == thin.spec.series_uid
    assert any("not chosen" in s.error and "thin slices" in s.error for s in result.skipped)


@pytest.mark.parametrize(("kernel", "sharpness"), [
    ("BONE", 2), ("BONEPLUS", 2), ("B60f", 2), ("B70f", 2), ("Br64", 2), ("Hr68\\3", 2), ("B50f", 1), ("LUNG", 1),
    ("EDGE", 1), ("B30f", 0), ("Br40", 0), ("STANDARD", 0), ("SOFT", 0), ("FC30", 0), ("", 0),
])
def test_kernel_sharpness(kernel, sharpness):
    assert kernel_sharpness(kernel) == sharpness


def test_localizer_series_is_never_chosen(tmp_path):
    write_series(tmp_path / "in" / "scout", CTSeriesSpec(series_number=1, description="Topogram", n_slices=20,
                                                         image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                                         kernel="BONE", slice_spacing=1.0))
    axial = write_series(tmp_path / "in" / "axial", CTSeriesSpec(series_number=2))
    result = run(tmp_path, tmp_path / "in")
    assert only_series(result).series_instance_uid == axial.spec.series_uid
    assert any("series 1 'Topogram'" in s.error and "localizer" in s.error for s in result.skipped)


def test_localizer_images_inside_an_axial_series_are_dropped(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec(n_slices=12))
    for path in written.paths[:2]:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    result = run(tmp_path, tmp_path / "in")
    assert only_series(result).n_slices == 10
    assert any("2 localizer (scout) images ignored" in s.error for s in result.skipped)


def test_only_a_localizer_is_an_error_with_the_reason(tmp_path):
    write_series(tmp_path / "in", CTSeriesSpec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    result = run(tmp_path, tmp_path / "in")
    assert result.series == []
    assert len(result.errors) == 1
    assert "no analysable axial CT series" in result.errors[0].error and "localizer" in result.errors[0].error


def test_one_series_per_study(tmp_path):
    a = write_series(tmp_path / "in" / "a", CTSeriesSpec(study="A"))
    b = write_series(tmp_path / "in" / "b", CTSeriesSpec(study="B", patient_id="TEST-0002"))
    result = run(tmp_path, tmp_path / "in")
    assert result.errors == []
    assert sorted(s.study_instance_uid for s in result.series) == sorted([a.spec.study_uid, b.spec.study_uid])


@pytest.mark.parametrize(("spec", "reason"), [
    (CTSeriesSpec(n_slices=5), "only 5 slices; at least 8 are needed"),
    (CTSeriesSpec(orientation=SAGITTAL), "sagittal images, not axial"),
    (CTSeriesSpec(slice_spacing=12.0), "slices are 12.0 mm apart"),
], ids=["too-few-slices", "sagittal", "too-coarse"])
def test_series_rejected_with_reason(tmp_path, spec, reason):
    write_series(tmp_path / "in", spec)
    result = run(tmp_path, tmp_path / "in")
    assert result.series == []
    assert reason in result.errors[0].error
    assert any(reason in s.error for s in result.skipped)


def test_mixed_orientation_or_size_or_patient_is_rejected(tmp_path):
    written = write_series(tmp_path / "orient", CTSeriesSpec())
    ds = pydicom.dcmread(written.paths[3])
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9805807, -0.1961161]
    ds.save_as(written.paths[3])
    written = write_series(tmp_path / "patients", CTSeriesSpec(study="P"))
    ds = pydicom.dcmread(written.paths[3])
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(written.paths[3])
    errors = {Path(e.path).name: e.error for e in run(tmp_path, tmp_path / "orient", tmp_path / "patients").errors}
    assert "different orientations" in errors["orient"]
    assert "different patient IDs" in errors["patients"]
    assert "SOMEONE-ELSE" not in errors["patients"]


def test_size_mismatch_is_rejected(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec())
    for path in written.paths[:3]:
        ds = pydicom.dcmread(path)
        ds.Rows = 32  # rejected from the header; the pixels are never decoded
        ds.save_as(path)
    result = run(tmp_path, tmp_path / "in")
    assert result.series == [] and "different sizes (32 x 64, 64 x 64)" in result.errors[0].error


def test_tilted_gantry_is_accepted_with_a_warning(tmp_path):
    tilt = np.radians(15)
    spec = CTSeriesSpec(orientation=(1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt))))
    written = write_series(tmp_path / "in", spec)
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    assert any("tilted 15 degrees" in w for w in series.warnings)


# --- gaps, duplicates and uneven spacing -------------------------------------------------------

def test_gap_is_reported_where_it_is(tmp_path):
    positions = tuple(2.0 * i for i in range(12) if i not in (5, 6))
    written = write_series(tmp_path / "in", CTSeriesSpec(positions=positions))
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    assert series.warnings == ["gap of 6.0 mm between slices 5 and 6 (z 8.0 and 14.0 mm; expected 2.0 mm); "
                               "results near it are less reliable"]


def test_gap_longer_than_the_limit_rejects_the_series(tmp_path):
    positions = tuple(2.0 * i for i in range(10)) + tuple(60.0 + 2.0 * i for i in range(10))
    write_series(tmp_path / "in", CTSeriesSpec(positions=positions))
    result = run(tmp_path, tmp_path / "in")
    assert result.series == []
    assert "the series is incomplete: gap of 42.0 mm between slices 10 and 11" in result.errors[0].error


def test_duplicate_positions_are_removed(tmp_path):
    positions = (0.0, 2.0, 4.0, 4.0, 6.0, 8.0, 10.0, 10.0, 12.0, 14.0, 16.0)
    written = write_series(tmp_path / "in", CTSeriesSpec(positions=positions))
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert series.n_slices == 9
    np.testing.assert_allclose(series.z_mm, np.arange(0.0, 17.0, 2.0), atol=1e-3)
    assert "2 duplicate slice positions removed" in series.warnings
    kept = {written.sop_uids.index(uid) for uid in series.sop_instance_uids}
    for i, uid in enumerate(series.sop_instance_uids):
        np.testing.assert_array_equal(series.hu[i], written.hu[written.sop_uids.index(uid)])
    assert len(kept) == 9


def test_the_same_images_given_twice_are_read_once(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec())
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in written.paths:
        (copy / path.name).write_bytes(path.read_bytes())
    result = run(tmp_path, tmp_path / "in", copy)
    series = only_series(result)
    assert_matches(series, written)
    assert series.warnings == []
    assert any("10 duplicate copies of the same images ignored" in s.error for s in result.skipped)


def test_uneven_spacing_is_warned_and_kept_as_acquired(tmp_path):
    positions = (0.0, 1.0, 2.0, 3.0, 4.0, 5.3, 6.3, 7.3, 8.3, 9.3)
    written = write_series(tmp_path / "in", CTSeriesSpec(positions=positions))
    series = only_series(run(tmp_path, tmp_path / "in"))
    assert_matches(series, written)
    assert series.warnings == ["slice spacing is not uniform (1.0 to 1.3 mm, mostly 1.0 mm); "
                               "slices are interpolated along z"]


# --- planning first, decoding later (the analysis pipeline reads while it works) ---------------

def _same_result(a, b) -> None:
    assert [str(e) for e in a.errors] == [str(e) for e in b.errors]
    assert [str(e) for e in a.skipped] == [str(e) for e in b.skipped]


def test_plan_decodes_nothing_until_asked_then_streams_in_slice_order(tmp_path, monkeypatch):
    written = write_series(tmp_path / "in" / "a", CTSeriesSpec(n_slices=12))
    write_series(tmp_path / "in" / "b", CTSeriesSpec(n_slices=10, study="study-2", series_number=3))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    decoded = []
    real_decode = app.ingest._decode_into
    monkeypatch.setattr(app.ingest, "_decode_into", lambda h, out: (decoded.append(h.sop_uid), real_decode(h, out)))
    calls = []
    plan = plan_ingest([tmp_path / "in"], tmp_path / "work", progress=lambda done, total: calls.append((done, total)))
    assert decoded == [] and calls[-1] == (23, 23)  # headers only, every file once
    assert [p.n_slices for p in plan.studies] == [12, 10]
    pending = plan.studies[0]
    opened = pending.open()
    assert opened.sop_instance_uids == written.sorted_sops and opened.hu.shape == (12, 64, 64)
    chunks = pending.decode_chunks(5)
    first = next(chunks)
    assert decoded == written.sorted_sops[:5]  # one chunk decoded, no more
    np.testing.assert_array_equal(first, written.sorted_hu[:5])
    assert [len(c) for c in chunks] == [5, 2]
    assert pending.load() is opened  # every slice was readable: the streamed series is the result
    assert_matches(opened, written)
    second = plan.studies[1].load()
    reference = run(tmp_path, tmp_path / "in")
    for got, want in zip([opened, second], reference.series, strict=True):
        np.testing.assert_array_equal(got.hu, want.hu)
        assert (got.sop_instance_uids, got.warnings, got.selection_reason) == (
            want.sop_instance_uids, want.warnings, want.selection_reason)
    _same_result(plan.result, reference)


def test_a_slice_unreadable_while_streaming_is_dropped_from_the_loaded_series(tmp_path):
    written = write_series(tmp_path / "in", CTSeriesSpec(n_slices=12))
    damaged = written.paths[written.order[4]]  # the fifth slice along z
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    plan = plan_ingest([tmp_path / "in"], tmp_path / "work")
    pending = plan.studies[0]
    opened = pending.open()
    assert sum(len(c) for c in pending.decode_chunks(4)) == 12
    series = pending.load()
    assert series is not opened and series.n_slices == 11
    assert written.sorted_sops[4] not in series.sop_instance_uids
    np.testing.assert_array_equal(series.hu, np.delete(written.sorted_hu, 4, axis=0))
    assert "1 slice could not be read (see errors)" in series.warnings
    assert [e.path for e in plan.result.errors] == [str(damaged)]
    reference = run(tmp_path, tmp_path / "in")
    np.testing.assert_array_equal(series.hu, reference.series[0].hu)
    assert series.warnings == reference.series[0].warnings
    _same_result(plan.result, reference)


def test_study_without_an_analysable_series_is_explained_when_loaded(tmp_path):
    write_series(tmp_path / "in", CTSeriesSpec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    plan = plan_ingest([tmp_path / "in"], tmp_path / "work")
    pending = plan.studies[0]
    assert pending.n_slices == 0 and pending.open() is None and pending.load() is None
    assert "no analysable axial CT series" in plan.result.errors[0].error
