"""The clinic runtime: model loading, the streaming pipeline, aggregation, findings and heatmaps."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from model_helpers import (
    MODEL_FILE,
    TINY_CONTRACT,
    bone_block_volume,
    copy_model_folder,
    shared_tiny_model,
    synthetic_series,
)

from app.analysis import AnalysisError, build_study_result, heatmap_slices, suspicious_runs
from app.domain import ModelRef
from app.engine import AnalysisCancelled, Analyzer, StageClock, model_input_batches, resampled_chunks
from app.heatmap import cam_to_image, hot_region
from app.runtime import ModelLoadError, load_model
from model_zoo.card import Aggregation, ModelCard, load_card, sha256_file
from model_zoo.contract import InputContract, analysed_slices, resample_inplane, volume_to_input
from model_zoo.litert import LiteRTError, _interpreter_class

REF = ModelRef(name="m", version="1", sha256="0" * 64, variant="float32")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def analyzer(tiny_model):
    return Analyzer(str(tiny_model), threads=1)


def _card(threshold=0.5, k=2, contract=TINY_CONTRACT) -> ModelCard:
    return ModelCard(name="m", version="1", architecture="x", contract=contract, threshold=threshold,
                     aggregation=Aggregation("top_k_mean", k))


# --- aggregation and findings with synthetic probabilities ----------------------------


def test_suspicious_runs_are_inclusive_runs_at_or_above_threshold():
    p = np.array([0.1, 0.6, 0.7, 0.2, 0.5, 0.4, 0.9])
    assert suspicious_runs(p, 0.5) == [(1, 2), (4, 4), (6, 6)]
    assert suspicious_runs(p, 0.95) == []
    assert suspicious_runs(np.ones(4), 0.5) == [(0, 3)]


def test_heatmap_slices_cover_every_run_peak_and_the_top_slices():
    p = np.array([0.9, 0.1, 0.6, 0.8, 0.7, 0.1, 0.55, 0.2])
    runs = suspicious_runs(p, 0.5)
    assert runs == [(0, 0), (2, 4), (6, 6)]
    assert heatmap_slices(p, runs, n_key=3) == [0, 3, 4, 6]


def _result_for(probabilities, threshold=0.5, k=2, hot_cell=(1, 2)):
    n = len(probabilities)
    series = synthetic_series(np.zeros((n, 128, 128), np.int16))
    cams = np.full((n, 2, 3), -3.0, np.float32)
    cams[:, hot_cell[0], hot_cell[1]] = 5.0
    return series, build_study_result(series, np.arange(n), np.asarray(probabilities), cams, _card(threshold, k), REF)


def test_study_probability_is_the_top_k_mean_and_positive_at_the_threshold():
    series, r = _result_for([0.1, 0.3, 0.9, 0.7, 0.2], threshold=0.8, k=2)
    assert r.probability == pytest.approx(0.8) and r.positive  # p == threshold counts as positive
    assert r.threshold == 0.8 and r.model == REF
    series, r = _result_for([0.1, 0.3, 0.9, 0.69, 0.2], threshold=0.8, k=2)
    assert r.probability == pytest.approx(0.795) and not r.positive
    _, r = _result_for([0.2, 0.4], k=5)  # k larger than the series: mean of all slices
    assert r.probability == pytest.approx(0.3)


def test_findings_report_runs_with_peak_and_region_in_original_pixels():
    probs = [0.1, 0.6, 0.95, 0.7, 0.2, 0.1, 0.8, 0.3]
    series, r = _result_for(probs, threshold=0.5)
    assert [(f.slice_start, f.slice_end, f.peak_slice) for f in r.findings] == [(1, 3, 2), (6, 6, 6)]
    f = r.findings[0]
    assert f.peak_sop_instance_uid == series.sop_instance_uids[2]
    assert f.peak_probability == pytest.approx(0.95)
    assert (f.z_start_mm, f.z_end_mm) == (series.z_mm[1], series.z_mm[3])
    # cam cell (1, 2) of the 64 x 96 mm grid is rows 0..32 mm, cols 16..48 mm from the image centre.
    row0, col0, row1, col1 = f.bbox_px
    assert row0 <= f.center_px[0] <= row1 and col0 <= f.center_px[1] <= col1
    assert 63 <= f.center_px[0] <= 107 and 84 <= f.center_px[1] <= 127
    assert row0 >= 60 and col0 >= 80  # the box stays around the hot cell
    for index in (2, 6):
        heat = r.heatmaps[index]
        assert heat.shape == (128, 128) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["findings"][0]["bbox_px"] == list(f.bbox_px)


def test_negative_study_has_no_findings_but_keeps_key_slice_heatmaps():
    _, r = _result_for([0.1, 0.2, 0.05, 0.3], threshold=0.5)
    assert not r.positive and r.findings == []
    assert sorted(r.heatmaps) == [0, 1, 3]


def test_negative_study_has_no_findings_even_when_one_slice_crosses_the_threshold():
    _, r = _result_for([0.1, 0.9, 0.2, 0.1], threshold=0.8, k=2)  # top-2 mean 0.55: negative
    assert not r.positive and r.findings == []
    assert 1 in r.heatmaps and r.key_slices(1) == [1]  # the hottest slice is still shown as a key image


def test_slices_between_analysed_ones_get_interpolated_probabilities_but_no_heatmap():
    n = 7
    series = synthetic_series(np.zeros((n, 128, 128), np.int16), slice_spacing_mm=1.0)
    analysed = np.array([0, 2, 4, 6])
    cams = np.full((4, 2, 3), -3.0, np.float32)
    r = build_study_result(series, analysed, np.array([0.1, 0.9, 0.3, 0.2]), cams, _card(0.5, 1), REF)
    assert r.probability == pytest.approx(0.9)  # aggregated over model outputs only
    p = [s.probability for s in r.slices]
    assert p[2] == pytest.approx(0.9) and p[1] == pytest.approx(0.5) and p[3] == pytest.approx(0.6)
    assert [s.analysed for s in r.slices] == [True, False, True, False, True, False, True]
    assert [(f.slice_start, f.slice_end, f.peak_slice) for f in r.findings] == [(1, 3, 2)]
    assert set(r.heatmaps) <= set(analysed.tolist()) and set(r.key_slices(3)) <= set(analysed.tolist())
    doc = r.to_json()["slices"]
    assert doc[1]["interpolated"] is True and "interpolated" not in doc[2]
    with pytest.raises(AnalysisError, match="analysed slices"):
        build_study_result(series, analysed[:3], np.array([0.1, 0.9, 0.3, 0.2]), cams, _card(), REF)


def test_nan_probabilities_are_an_error_not_a_result():
    with pytest.raises(AnalysisError, match="NaN"):
        _result_for([0.1, float("nan"), 0.3])


def test_an_overflowed_cam_is_an_error_not_a_result():
    # sigmoid(inf) is a finite probability, but the heatmap of an inf cam is NaN and has no hot region
    series = synthetic_series(np.zeros((3, 128, 128), np.int16))
    cams = np.full((3, 2, 3), -3.0, np.float32)
    cams[1, 0, 0] = np.inf
    with pytest.raises(AnalysisError, match=r"\(non-finite\) heatmaps"):
        build_study_result(series, np.arange(3), np.array([0.1, 1.0, 0.3]), cams, _card(), REF)


# --- heatmaps back on the original pixel grid ------------------------------------------


@pytest.mark.parametrize(("shape", "spacing", "contract", "cell"), [
    ((512, 512), (0.7, 0.7), InputContract(), (5, 7)),
    ((100, 150), (0.8, 0.6), TINY_CONTRACT, (1, 2)),  # anisotropic pixels, non-square image
    ((200, 120), (0.5, 0.9), TINY_CONTRACT, (0, 0)),  # corner cell
    ((300, 300), (0.25, 0.25), TINY_CONTRACT, (1, 1)),  # image larger than the contract grid
])
def test_hot_cam_cell_lands_on_its_physical_position(shape, spacing, contract, cell):
    h, w = contract.height // 32, contract.width // 32
    cam = np.zeros((h, w), np.float32)
    cam[cell] = 4.0
    heat = cam_to_image(cam, shape, spacing, contract)
    # Cell centre in mm from the grid (= image) centre, then in original pixels.
    row_mm = (cell[0] - (h - 1) / 2) * 32 * contract.pixel_spacing_mm
    col_mm = (cell[1] - (w - 1) / 2) * 32 * contract.pixel_spacing_mm
    expected = (row_mm / spacing[0] + (shape[0] - 1) / 2, col_mm / spacing[1] + (shape[1] - 1) / 2)
    assert heat[round(expected[0]), round(expected[1])] > 0.98  # the cell centre is (nearly) the maximum
    region = hot_region(heat)
    row0, col0, row1, col1 = region.bbox_px
    assert row0 <= expected[0] <= row1 and col0 <= expected[1] <= col1
    # Interior cells peak at their centre; edge cells hold their value out to the field edge.
    half_cell_px = (16 / spacing[0], 16 / spacing[1])
    assert abs(region.center_px[0] - expected[0]) <= half_cell_px[0] + 1
    assert abs(region.center_px[1] - expected[1]) <= half_cell_px[1] + 1


def test_heatmap_is_zero_outside_the_field_the_model_saw():
    contract = InputContract()  # 256 x 320 mm; a 512 x 512 image at 0.9 mm covers 460 mm
    cam = np.random.default_rng(0).normal(size=(8, 10)).astype(np.float32)
    heat = cam_to_image(cam, (512, 512), (0.9, 0.9), contract)
    half_rows, half_cols = 128 / 0.9, 160 / 0.9
    centre = 255.5
    assert heat[: int(centre - half_rows) - 1].max() == 0.0 and heat[int(centre + half_rows) + 2:].max() == 0.0
    assert heat[:, : int(centre - half_cols) - 1].max() == 0.0 and heat[:, int(centre + half_cols) + 2:].max() == 0.0
    assert heat.max() == pytest.approx(1.0)


def test_bright_spot_survives_the_round_trip_through_the_contract_grid():
    # Forward: image -> contract grid; a stride-32 block mean stands in for the model's cam;
    # inverse: cam -> original pixels. The hot region must contain the bright spot.
    contract = InputContract()
    image = np.zeros((512, 512), np.float32)
    image[300:330, 150:180] = 2000.0  # ~21 mm square, rows below and cols left of centre
    grid = resample_inplane(image, (0.7, 0.7), contract)[0]
    cam = grid.reshape(8, 32, 10, 32).mean(axis=(1, 3))
    region = hot_region(cam_to_image(cam, image.shape, (0.7, 0.7), contract))
    row0, col0, row1, col1 = region.bbox_px
    assert row0 <= 315 <= row1 and col0 <= 165 <= col1
    assert abs(region.center_px[0] - 315) < 32 / 0.7 and abs(region.center_px[1] - 165) < 32 / 0.7


def test_hot_region_box_covers_only_the_component_of_the_maximum():
    heat = np.zeros((50, 60), np.float32)
    heat[5:10, 5:12] = 0.8
    heat[30:40, 40:55] = 0.9
    heat[35, 50] = 1.0
    region = hot_region(heat)
    assert region.center_px == (35, 50)
    assert region.bbox_px == (30, 40, 39, 54)
    heat[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite values"):
        hot_region(heat)


# --- the streaming pipeline ----------------------------------------------------------


def _uneven_volume(n=23, seed=1):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 2000, size=(n, 40, 44)).astype(np.int16)
    z = np.cumsum(rng.choice([0.7, 1.3, 2.0, 4.5], size=n)) - 50.0  # irregular spacing with gaps
    return hu, z


@pytest.mark.parametrize(("batch_size", "reuse"), [(1, 0), (3, 0), (8, 0), (64, 0), (3, 2), (1, 4)])
def test_streamed_inputs_equal_the_whole_volume_contract(batch_size, reuse):
    hu, z = _uneven_volume()
    contract = InputContract(height=32, width=32, z_offsets_mm=(-2.0, 0.0, 2.0))
    expected = volume_to_input(hu, (0.9, 1.1), z, contract)
    chunks = (hu[i:i + batch_size] for i in range(0, len(hu), batch_size))
    batches = model_input_batches(resampled_chunks(chunks, (0.9, 1.1), contract), z, contract, batch_size,
                                  reuse=reuse)
    got = [(rows, x.copy()) for rows, x in batches]  # a reused buffer is only valid until the next batches
    assert [int(indices[0]) for indices, _ in got] == list(range(0, len(hu), batch_size))
    assert all(len(x) == batch_size for _, x in got[:-1])
    assert np.array_equal(np.concatenate([x for _, x in got]), expected)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_streamed_inputs_of_the_analysed_slices_only(batch_size):
    hu, z = _uneven_volume()
    contract = InputContract(height=32, width=32, z_step_mm=2.0)
    targets = analysed_slices(z, contract)
    assert 0 < len(targets) < len(z)  # the uneven volume has slices closer than 1.5 mm
    expected = volume_to_input(hu, (0.9, 1.1), z, contract)[targets]
    chunks = (hu[i:i + 2] for i in range(0, len(hu), 2))
    got = [(i.copy(), x.copy()) for i, x in model_input_batches(
        resampled_chunks(chunks, (0.9, 1.1), contract), z, contract, batch_size, targets=targets)]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in got]), targets)
    assert np.array_equal(np.concatenate([x for _, x in got]), expected)


def test_streaming_starts_before_the_whole_series_is_read():
    hu, z = _uneven_volume(n=60)
    contract = InputContract(height=16, width=16)
    consumed = []

    def chunks():
        for i in range(0, len(hu), 4):
            consumed.append(i)
            yield hu[i:i + 4]

    clock = StageClock()
    batches = model_input_batches(resampled_chunks(chunks(), (1.0, 1.0), contract, clock), z, contract, 4, clock)
    next(batches)
    assert len(consumed) < 60 // 4 / 2
    rest = list(batches)
    assert sum(len(x) for _, x in rest) == 56
    assert clock.resample > 0 and clock.stack > 0 and set(clock.timing()) == {"read", "preprocess", "inference", "post"}


def test_a_source_that_ends_early_is_an_error():
    hu, z = _uneven_volume(n=10)
    with pytest.raises(ValueError, match="ended after 4 of 10"):
        contract = InputContract(height=8, width=8)
        list(model_input_batches(resampled_chunks(iter([hu[:0], hu[:4]]), (1.0, 1.0), contract), z, contract, 4))


# --- the Analyzer with a real TFLite model ----------------------------------------------


def test_analyzer_finds_the_bone_block_and_batch_size_does_not_change_results(tiny_model):
    series = synthetic_series(bone_block_volume())
    results = []
    for batch_size in (1, 7, 64):
        analyzer = Analyzer(str(tiny_model), threads=1, batch_size=batch_size)
        results.append(analyzer.analyze_series(series))
    first = results[0]
    assert first.positive and first.threshold == 0.5
    assert [(f.slice_start, f.slice_end) for f in first.findings] == [(10, 14)]
    row0, col0, row1, col1 = first.findings[0].bbox_px
    assert 62 <= first.findings[0].center_px[0] < 108 and 83 <= first.findings[0].center_px[1] < 128
    assert row0 >= 58 and col0 >= 80
    for other in results[1:]:
        np.testing.assert_allclose([s.probability for s in other.slices], [s.probability for s in first.slices],
                                   rtol=0, atol=1e-6)
        assert [f.to_json() for f in other.findings] == [f.to_json() for f in first.findings]
    assert set(first.timing_s) == {"read", "preprocess", "inference", "post", "total"}
    assert first.model.name == "tiny-test" and first.model.sha256 == sha256_file(tiny_model / MODEL_FILE)


def test_water_only_series_is_negative(analyzer):
    result = analyzer.analyze_series(synthetic_series(bone_block_volume(hot_slices=range(0))))
    assert not result.positive and result.findings == []
    assert result.probability < 0.1


def test_progress_and_cancel(analyzer):
    series = synthetic_series(bone_block_volume(n_slices=40))
    seen = []
    analyzer.analyze_series(series, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (40, 40) and seen == sorted(seen)

    long_series = synthetic_series(bone_block_volume(n_slices=200))
    before = threading.active_count()
    cancel = threading.Event()

    def failing_progress(done, total):  # a UI callback may raise to stop the work
        raise AnalysisCancelled("stop")

    for kwargs in ({"progress": lambda done, total: cancel.set(), "cancel": cancel}, {"progress": failing_progress}):
        try:
            analyzer.analyze_series(long_series, **kwargs)
        except AnalysisCancelled:
            # Checked while the traceback (and the generators in its frames) is still alive.
            assert threading.active_count() == before  # both producer threads were stopped and joined
        else:
            pytest.fail("the analysis was not cancelled")


def test_unsorted_series_is_refused(analyzer):
    series = synthetic_series(bone_block_volume(n_slices=5, hot_slices=range(2, 3)))
    series.z_mm = series.z_mm[::-1].copy()
    with pytest.raises(AnalysisError, match="not sorted"):
        analyzer.analyze_series(series)


# --- loading and verifying the model ----------------------------------------------------


def test_load_model_verifies_and_reports_identity(tiny_model):
    loaded = load_model(str(tiny_model), threads=2)
    assert loaded.variant == "float32" and loaded.threads == 2
    assert loaded.ref.sha256 == load_card(tiny_model).files[MODEL_FILE]
    assert load_model(str(tiny_model / MODEL_FILE)).ref == loaded.ref  # a .tflite path works too


def test_corrupt_model_file_is_refused_before_loading(tiny_model, tmp_path):
    folder = copy_model_folder(tiny_model, tmp_path / "m")
    data = bytearray((folder / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(str(folder))


def test_missing_model_file_is_a_clear_error(tiny_model, tmp_path):
    folder = copy_model_folder(tiny_model, tmp_path / "m")
    (folder / MODEL_FILE).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(str(folder))


def test_garbage_model_with_a_matching_hash_is_refused_by_litert(tiny_model, tmp_path):
    folder = copy_model_folder(tiny_model, tmp_path / "m")
    (folder / MODEL_FILE).write_bytes(b"not a flatbuffer" * 64)
    card = load_card(folder)
    card.record_hashes()
    card.save()
    with pytest.raises(ModelLoadError, match="corrupt or not a TFLite file"):
        load_model(str(folder))


def test_unverifiable_or_inconsistent_model_is_refused(tiny_model, tmp_path):
    folder = copy_model_folder(tiny_model, tmp_path / "m")
    card = load_card(folder)
    card.files = {}
    card.save()
    with pytest.raises(ModelLoadError, match="unverified"):
        load_model(str(folder))
    card = load_card(tiny_model)
    card.contract = InputContract(height=96, width=96)
    card.save(tmp_path / "other")
    (tmp_path / "other" / MODEL_FILE).write_bytes((tiny_model / MODEL_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="inconsistent"):
        load_model(str(tmp_path / "other"))


def test_unknown_model_and_variant_are_clear_errors(tiny_model):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="no variant 'int8'"):
        load_model(str(tiny_model), variant="int8")
    with pytest.raises(ModelLoadError, match="between 1 and 64"):
        load_model(str(tiny_model), threads=0)
    with pytest.raises(ModelLoadError, match="between 1 and 64"):  # a typo would start that many OS threads
        load_model(str(tiny_model), threads=2**31)


def test_a_broken_litert_install_is_reported_not_replaced_by_tensorflow(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("ai_edge_litert"):
            raise ImportError("libLiteRt.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(LiteRTError, match="installed but broken"):  # raised before any fallback import
        _interpreter_class()
