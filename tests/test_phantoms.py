"""Acceptance tests of the CT phantom generator (model_zoo.phantoms)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pydicom
import pytest

from model_zoo.phantoms import render_study, sample_study_spec, slice_labels, write_study_dicom
from model_zoo.phantoms.__main__ import main as phantoms_cli
from model_zoo.phantoms.anatomy import BONE_KINDS
from model_zoo.phantoms.montage import panels_from_study, save_montage
from model_zoo.phantoms.scanner import apply_scanner
from tests.dicom_factory import dciodvfy_report
from tests.phantom_helpers import (
    SEED,
    disc_mask,
    find_spec,
    hard_negative,
    nearest_slice,
    pixel_of,
    thin_slices_at,
)

N_SLICES = 8


@pytest.fixture(scope="module")
def positive_study():
    return render_study(sample_study_spec(SEED, 0, positive=True, n_slices=N_SLICES))


@pytest.fixture(scope="module")
def written_studies(tmp_path_factory):
    """Two small studies written as DICOM: (study, paths) pairs."""
    out = tmp_path_factory.mktemp("phantom_dicom")
    result = []
    for index, positive in ((0, True), (1, False)):
        study = render_study(sample_study_spec(SEED, index, positive=positive, n_slices=6))
        result.append((study, write_study_dicom(study, out / f"study_{index}")))
    return result


# ---- determinism and structure --------------------------------------------------------------


def test_same_seed_gives_identical_pixels_and_truth(positive_study):
    again = render_study(sample_study_spec(SEED, 0, positive=True, n_slices=N_SLICES))
    np.testing.assert_array_equal(again.hu, positive_study.hu)
    np.testing.assert_array_equal(again.lesion_mask, positive_study.lesion_mask)
    assert again.truth() == positive_study.truth()


def test_different_seed_or_index_differs(positive_study):
    other_seed = render_study(sample_study_spec(SEED + 1, 0, positive=True, n_slices=N_SLICES))
    other_index = sample_study_spec(SEED, 1, positive=True, n_slices=N_SLICES)
    assert not np.array_equal(other_seed.hu, positive_study.hu)
    assert other_seed.truth() != positive_study.truth()
    assert other_index.study_instance_uid != positive_study.spec.study_instance_uid


def test_study_arrays_and_geometry(positive_study):
    s = positive_study
    k = N_SLICES
    assert s.hu.shape == (k, 512, 512) and s.hu.dtype == np.float32
    assert s.lesion_mask.shape == s.bone_mask.shape == (k, 512, 512)
    assert s.lesion_mask.dtype == s.bone_mask.dtype == bool
    assert s.slice_labels.dtype == np.int8 and s.slice_labels.shape == (k,)
    assert np.all(np.diff(s.z_mm) > 0)
    assert 0.6 <= s.pixel_spacing_mm <= 1.0
    assert s.hu.min() >= -1024 and s.hu.max() <= 3071
    assert np.array_equal(s.hu, np.rint(s.hu))
    # Air around the patient, soft tissue and bone inside.
    assert np.median(s.hu[:, :8, :]) < -900
    assert s.bone_mask.any()


def test_positive_negative_balance_and_truth_contents():
    specs = [sample_study_spec(SEED, i, n_slices=N_SLICES) for i in range(16)]
    n_pos = sum(s.positive for s in specs)
    assert 3 <= n_pos <= 13
    for spec in specs:
        assert bool(spec.lesions) == spec.positive
        z = spec.z_mm
        for les in spec.lesions:
            assert z[0] <= les.center_mm[2] <= z[-1]
            assert 3.0 <= les.diameter_mm <= 30.0
            assert les.bone in BONE_KINDS and les.shape in ("round", "lobulated")
        for hn in spec.hard_negatives:
            if hn.center_mm is not None:
                assert z[0] - 1.0 <= hn.center_mm[2] <= z[-1] + 1.0


def test_truth_is_json_with_uids_lesions_and_hard_negatives(positive_study):
    truth = json.loads(json.dumps(positive_study.truth()))
    for key in (
        "study_instance_uid",
        "series_instance_uid",
        "frame_of_reference_uid",
        "positive",
        "lesions",
        "hard_negatives",
        "slice_labels",
        "scanner",
    ):
        assert key in truth
    assert truth["positive"] is True and truth["lesions"]
    assert set(truth["lesions"][0]) >= {"center_mm", "diameter_mm", "bone"}
    assert len(truth["slice_labels"]) == N_SLICES


def test_slice_label_rule():
    spec = sample_study_spec(SEED, 0, positive=True, n_slices=4)
    lesion = dataclasses.replace(spec.lesions[0], center_mm=(0.0, 0.0, 4.0), diameter_mm=6.0)
    z = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 12.0])
    # radius 3: |dz| <= 2.25 positive; sphere touches a 2.5 mm slab while |dz| < 4.25.
    assert slice_labels([lesion], z, 2.5).tolist() == [-1, 1, 1, 1, -1, 0]


def test_external_settings_lie_outside_training_ranges():
    for index in range(4):
        sc = sample_study_spec(SEED, index, n_slices=4, external=True).scanner
        assert sc.slice_thickness_mm >= 3.5 and sc.noise_sigma_hu >= 85.0
        assert sc.kvp < 120 and sc.bone_hu_scale > 1.05
        train = sample_study_spec(SEED, index, n_slices=4).scanner
        assert 1.0 <= train.slice_thickness_mm <= 3.0 and 15.0 <= train.noise_sigma_hu <= 80.0


# ---- lesions ---------------------------------------------------------------------------------


def test_lesions_lie_in_bone_and_have_lytic_density():
    checked = 0
    for index in range(0, 12, 2):
        study = render_study(sample_study_spec(SEED, index, positive=True, n_slices=12))
        assert study.slice_labels.max() == 1
        # Lesion pixels only where the label rule allows them.
        assert not study.lesion_mask[study.slice_labels == 0].any()
        assert not (study.lesion_mask & ~study.bone_mask).any()
        for les in study.spec.lesions:
            k = nearest_slice(study, les.center_mm[2])
            row, col = pixel_of(study, *les.center_mm[:2])
            assert study.bone_mask[k, row, col], f"lesion centre outside bone: {les}"
            inside = study.lesion_mask[k] & disc_mask(
                study, *les.center_mm[:2], 0.0, les.diameter_mm / 2.0 + 1.0
            )
            if inside.sum() < 40 or study.spec.anatomy.osteoporotic:
                continue
            ring = disc_mask(study, *les.center_mm[:2], les.diameter_mm / 2 + 1.5, les.diameter_mm / 2 + 5.0)
            surround = study.hu[k][ring & study.bone_mask[k] & ~study.lesion_mask[k]]
            if surround.size < 30:
                continue
            lesion_mean = float(study.hu[k][inside].mean())
            assert -100.0 < lesion_mean < 160.0, f"lesion mean {lesion_mean:.0f} HU is not soft tissue"
            assert lesion_mean < float(np.median(surround)) - 40.0
            checked += 1
    assert checked >= 2, "too few lesions large enough to measure"


# ---- hard negatives ---------------------------------------------------------------------------


def test_bone_island_is_dense():
    spec = find_spec(
        lambda s: (h := hard_negative(s, "bone_island")) is not None and h.size_mm >= 5.0, positive=False
    )
    island = hard_negative(spec, "bone_island")
    study = thin_slices_at(spec, island.center_mm[2])
    k = nearest_slice(study, island.center_mm[2])
    region = disc_mask(study, *island.center_mm[:2], 0.0, 0.35 * island.size_mm)
    assert study.hu[k][region].mean() > 600.0


def test_schmorl_node_is_darker_than_trabecular_bone():
    spec = find_spec(
        lambda s: (
            (h := hard_negative(s, "schmorl_node")) is not None
            and h.size_mm >= 7.0
            and not s.anatomy.osteoporotic
        ),
        positive=False,
    )
    node = hard_negative(spec, "schmorl_node")
    vertebra = next(v for v in spec.anatomy.vertebrae if v.name == node.vertebra)
    inward = 1.0 if node.center_mm[2] < vertebra.z_mid else -1.0
    z = node.center_mm[2] + inward * 0.15 * node.size_mm  # inside the body, clear of the sclerotic rim
    study = thin_slices_at(spec, z)
    k = nearest_slice(study, z)
    core = disc_mask(study, *node.center_mm[:2], 0.0, 0.25 * node.size_mm)
    body = disc_mask(study, 0.0, vertebra.y_center, 0.0, 0.6 * vertebra.half_depth)
    surround = (
        body & ~disc_mask(study, *node.center_mm[:2], 0.0, 0.5 * node.size_mm + 3.0) & study.bone_mask[k]
    )
    assert surround.sum() > 30
    assert study.hu[k][core].mean() < np.median(study.hu[k][surround]) - 50.0


def test_basivertebral_vein_channel_is_darker_than_trabecular_bone():
    spec = find_spec(
        lambda s: hard_negative(s, "basivertebral_vein") is not None and not s.anatomy.osteoporotic
    )
    vein = hard_negative(spec, "basivertebral_vein")
    vertebra = next(v for v in spec.anatomy.vertebrae if v.name == vein.vertebra)
    study = thin_slices_at(spec, vein.center_mm[2])
    k = nearest_slice(study, vein.center_mm[2])
    x = vein.center_mm[0]
    stem = np.zeros(study.hu.shape[1:], dtype=bool)
    for y in np.linspace(
        vertebra.y_center + 0.2 * vertebra.half_depth, vertebra.y_center + 0.75 * vertebra.half_depth, 6
    ):
        stem |= disc_mask(study, x, y, 0.0, 0.3 * vein.size_mm + 0.3)
    side = disc_mask(
        study, x + 0.45 * vertebra.half_width, vertebra.y_center + 0.3 * vertebra.half_depth, 0.0, 4.0
    )
    assert study.hu[k][stem].mean() < study.hu[k][side].mean() - 50.0


def test_osteophyte_adds_bone_outside_the_vertebral_body():
    spec = find_spec(
        lambda s: (h := hard_negative(s, "osteophyte")) is not None and h.size_mm >= 5.0, positive=False
    )
    spur = hard_negative(spec, "osteophyte")
    vertebra = next(v for v in spec.anatomy.vertebrae if v.name == spur.vertebra)
    toward_disc = 1.0 if spur.center_mm[2] >= vertebra.z_mid else -1.0
    z = spur.center_mm[2] + toward_disc * 1.5
    with_spur = thin_slices_at(spec, z)
    without = thin_slices_at(dataclasses.replace(spec, hard_negatives=()), z)
    k = nearest_slice(with_spur, z)
    x, y = spur.center_mm[:2]
    angle = np.arctan2(y - vertebra.y_center, x)
    tip = disc_mask(
        with_spur, x + np.cos(angle) * 0.35 * spur.size_mm, y + np.sin(angle) * 0.35 * spur.size_mm, 0, 1.0
    )
    assert with_spur.bone_mask[k][tip].all() and not without.bone_mask[k][tip].any()


def test_osteoporosis_lowers_vertebral_density():
    def body_mean(spec):
        v = next(v for v in spec.anatomy.vertebrae if spec.z_mm[0] <= v.z_mid <= spec.z_mm[-1])
        study = thin_slices_at(spec, v.z_mid, n_slices=3)
        return float(study.hu[1][disc_mask(study, 0.0, v.y_center, 0.0, 0.5 * v.half_depth)].mean())

    def covers_a_body(spec):
        return any(spec.z_mm[0] <= v.z_mid <= spec.z_mm[-1] for v in spec.anatomy.vertebrae)

    porotic = find_spec(lambda s: s.anatomy.osteoporotic and covers_a_body(s), positive=False, n_slices=24)
    normal = find_spec(lambda s: not s.anatomy.osteoporotic and covers_a_body(s), positive=False, n_slices=24)
    assert any(h.kind == "osteoporosis" for h in porotic.hard_negatives)
    assert body_mean(porotic) < 170.0 < body_mean(normal)


# ---- DICOM -------------------------------------------------------------------------------------


def test_dicom_round_trip_gives_generated_hu_and_geometry(written_studies):
    for study, paths in written_studies:
        assert [p.name for p in paths] == [f"{k + 1:04d}.dcm" for k in range(len(paths))]
        for k, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            np.testing.assert_allclose(hu, study.hu[k], atol=0.5)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            x0, y0 = study.origin_xy_mm
            np.testing.assert_allclose(
                [float(v) for v in ds.ImagePositionPatient], [x0, y0, study.z_mm[k]], atol=1e-3
            )
            assert float(ds.PixelSpacing[0]) == pytest.approx(study.pixel_spacing_mm)
            assert float(ds.SliceThickness) == pytest.approx(study.spec.scanner.slice_thickness_mm)
            assert float(ds.SpacingBetweenSlices) == pytest.approx(study.spec.scanner.slice_spacing_mm)
            assert ds.StudyInstanceUID == study.spec.study_instance_uid
            assert ds.SeriesInstanceUID == study.spec.series_instance_uid
            assert ds.ConvolutionKernel and ds.KVP and ds.BodyPartExamined
            assert str(ds.PatientName) == study.spec.patient_name and len(ds.PatientBirthDate) == 8
        uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        assert len(uids) == len(paths)


def test_dciodvfy_reports_no_errors(written_studies):
    for _, paths in written_studies:
        for path in (paths[0], paths[len(paths) // 2], paths[-1]):
            report = dciodvfy_report(path)
            assert "CTImage" in report, report
            errors = [line for line in report.splitlines() if "Error" in line]
            assert not errors, f"{path.name}: {errors}"


# ---- CLI and montage -------------------------------------------------------------------------


def test_cli_writes_studies_and_truth(tmp_path, capsys):
    code = phantoms_cli([str(tmp_path / "ds"), "--studies", "2", "--seed", "5", "--slices", "4"])
    assert code == 0
    assert "studies/s" in capsys.readouterr().out
    truth = json.loads((tmp_path / "ds" / "truth.json").read_text())
    assert [s["positive"] for s in truth["studies"]] == [True, False]
    for entry in truth["studies"]:
        files = sorted((tmp_path / "ds" / entry["folder"]).glob("*.dcm"))
        assert len(files) == 4
        assert (
            pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID == entry["study_instance_uid"]
        )


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit) as exc:
        phantoms_cli([str(tmp_path), "--studies", "0"])
    assert exc.value.code == 2


def test_montage_png(tmp_path, positive_study):
    panels = panels_from_study(positive_study, {"positive", "negative", "osteoporosis", "bone_island"})
    assert panels and panels[0].kind == "positive"
    path = save_montage(panels, tmp_path / "montage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 1_500_000


def test_scanner_noise_has_the_drawn_sigma_and_kernel_texture():
    sharp, smooth = (np.zeros((2, 256, 256), dtype=np.float32) for _ in range(2))
    apply_scanner(sharp, np.random.default_rng(1), 0.7, 0.4, 0.5, 40.0, 0.0, 0.0, 1.0)
    apply_scanner(smooth, np.random.default_rng(1), 0.7, 1.0, 0.0, 40.0, 0.0, 0.0, 1.0)
    for noise in (sharp, smooth):
        assert noise.std() == pytest.approx(40.0, rel=0.05)

    def neighbour_correlation(img):
        return np.corrcoef(img[:, :, :-1].ravel(), img[:, :, 1:].ravel())[0, 1]

    # A smooth (soft-tissue) kernel gives coarser grain than a sharp bone kernel.
    assert neighbour_correlation(smooth) > neighbour_correlation(sharp) + 0.2
