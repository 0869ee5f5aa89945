import numpy as np
import pytest

from model_zoo.contract import (
    AIR_HU,
    InputContract,
    Window,
    analysed_slices,
    apply_windows,
    interpolate_to_slices,
    iter_input_batches,
    model_input,
    resample_inplane,
    stack_25d,
    volume_to_input,
)

C = InputContract()


def test_contract_round_trips_through_json_dict():
    c = InputContract(pixel_spacing_mm=0.9, height=128, width=160, z_offsets_mm=(-1.0, 0.0, 1.0),
                      windows=(Window(400, 1500),))
    assert InputContract.from_dict(c.to_dict()) == c
    assert c.channels == 3 and c.input_shape == (128, 160, 3)


def test_resample_keeps_physical_size_and_centre():
    # A 20 mm square at the image centre, on a 0.5 mm grid, must stay 20 px wide at 1 mm.
    img = np.full((400, 400), -50.0, np.float32)
    img[180:220, 180:220] = 1000.0
    out = resample_inplane(img, (0.5, 0.5), C)[0]
    rows = np.flatnonzero(out[:, C.width // 2] > 500)
    cols = np.flatnonzero(out[C.height // 2, :] > 500)
    assert 19 <= len(rows) <= 21 and 19 <= len(cols) <= 21
    assert abs(rows.mean() - (C.height - 1) / 2) <= 1 and abs(cols.mean() - (C.width - 1) / 2) <= 1


def test_outside_the_field_of_view_is_air():
    img = np.zeros((100, 100), np.float32)  # 100 mm FOV at 1 mm: the 256x320 grid extends beyond it
    out = resample_inplane(img, (1.0, 1.0), C)[0]
    assert out[0, 0] == AIR_HU and out[C.height // 2, C.width // 2] == 0.0


def test_5mm_lesion_spans_at_least_5_pixels():
    assert 5.0 / C.pixel_spacing_mm >= 5


def test_stack_interpolates_along_z_and_clamps_at_edges():
    vol = np.stack([np.full((4, 5), z, np.float32) for z in (0.0, 10.0, 20.0)])  # value = z
    z = np.array([0.0, 10.0, 20.0])
    out = stack_25d(vol, z, np.array([0.0, 10.0, 15.0]), C)
    assert out.shape == (3, 4, 5, 3)
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.0, 2.0])  # clamps below the first slice
    np.testing.assert_allclose(out[1, 0, 0], [8.0, 10.0, 12.0])
    np.testing.assert_allclose(out[2, 0, 0], [13.0, 15.0, 17.0])


def test_unsorted_positions_are_rejected():
    with pytest.raises(ValueError, match="increasing"):
        stack_25d(np.zeros((2, 3, 3)), np.array([5.0, 1.0]), np.array([1.0]), C)


def test_windows_map_to_unit_range_window_major():
    stack = np.array([-1000.0, 150.0, 3000.0], np.float32).reshape(1, 1, 1, 3)
    x = apply_windows(stack, C)
    assert x.shape == (1, 1, 1, 6) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0, :3], [0.0, 0.5, 1.0])  # window (150, 700)
    assert x.min() >= 0 and x.max() <= 1


def test_thin_slices_are_analysed_about_one_step_apart():
    c = InputContract(z_step_mm=2.0)
    z = 100.0 + np.arange(11) * 1.0  # 1 mm slices: every other one, plus the last
    np.testing.assert_array_equal(analysed_slices(z, c), [0, 2, 4, 6, 8, 10])
    z = 100.0 + np.arange(10) * 0.7
    np.testing.assert_array_equal(analysed_slices(z, c), [0, 3, 6, 9])
    for spacing in (1.5, 2.5, 5.0):  # already coarse enough: every slice
        z = np.arange(8) * spacing
        np.testing.assert_array_equal(analysed_slices(z, c), np.arange(8))
    np.testing.assert_array_equal(analysed_slices(np.arange(9) * 0.5, InputContract(z_step_mm=0.0)), np.arange(9))
    rng = np.random.default_rng(3)
    z = np.cumsum(rng.uniform(0.4, 1.4, 200))
    gaps = np.diff(z[analysed_slices(z, c)])
    assert gaps.max() <= 1.5 * c.z_step_mm + 1e-9


def test_skipped_slices_get_probabilities_interpolated_along_z():
    z = np.array([0.0, 1.0, 2.0, 3.0, 4.5])
    analysed = np.array([0, 2, 4])
    p = interpolate_to_slices(z, analysed, [0.2, 0.6, 0.0])
    np.testing.assert_allclose(p, [0.2, 0.4, 0.6, 0.36, 0.0])


def test_the_step_is_part_of_the_stored_contract():
    d = InputContract(z_step_mm=0.0).to_dict()
    assert d["z_step_mm"] == 0.0 and InputContract.from_dict(d).z_step_mm == 0.0
    with pytest.raises(ValueError, match="z_step_mm"):
        InputContract(z_step_mm=-1.0)


def test_batches_equal_whole_volume():
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, (7, 60, 70)).astype(np.float32)
    z = np.cumsum(rng.uniform(1, 3, 7))
    small = InputContract(height=32, width=64)
    whole = volume_to_input(vol, (0.8, 0.8), z, small)
    resampled = resample_inplane(vol, (0.8, 0.8), small)
    batches = list(iter_input_batches(resampled, z, small, batch_size=3))
    indices = np.concatenate([i for i, _ in batches])
    np.testing.assert_array_equal(indices, analysed_slices(z, small))
    np.testing.assert_array_equal(whole[indices], np.concatenate([x for _, x in batches]))
    np.testing.assert_array_equal(whole, model_input(resampled, z, z, small))


# --- the optimised contract against the straightforward reference -----------------------------
# The implementation above this line of the contract's history, kept here verbatim in spirit:
# whole-array NumPy expressions, easy to check by eye. The optimised functions must give the
# same numbers (|diff| <= 1e-6) for every input kind, so models trained with either agree.


def _reference_taps(n_out, out_spacing, n_in, in_spacing):
    out_mm = (np.arange(n_out, dtype=np.float64) - (n_out - 1) / 2.0) * out_spacing
    src = out_mm / in_spacing + (n_in - 1) / 2.0
    inside = (src >= -0.5) & (src <= n_in - 0.5)
    src = np.clip(src, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32), inside


def reference_resample(slices, spacing, contract):
    slices = np.asarray(slices)
    slices = slices[None] if slices.ndim == 2 else slices
    r0, r1, rw, rin = _reference_taps(contract.height, contract.pixel_spacing_mm, slices.shape[1], spacing[0])
    c0, c1, cw, cin = _reference_taps(contract.width, contract.pixel_spacing_mm, slices.shape[2], spacing[1])
    src = slices.astype(np.float32, copy=False)
    tmp = src[:, r0, :] * (1.0 - rw)[None, :, None] + src[:, r1, :] * rw[None, :, None]
    out = tmp[:, :, c0] * (1.0 - cw) + tmp[:, :, c1] * cw
    out[:, ~rin, :] = AIR_HU
    out[:, :, ~cin] = AIR_HU
    return out


def reference_stack(resampled, z, targets, contract):
    z = np.asarray(z, dtype=np.float64)
    targets = np.atleast_1d(np.asarray(targets, dtype=np.float64))
    offsets = np.asarray(contract.z_offsets_mm, dtype=np.float64)
    want = np.clip(targets[:, None] + offsets[None, :], z[0], z[-1])
    if len(z) == 1:
        return np.repeat(resampled[:1, :, :, None], len(offsets), axis=3).repeat(len(targets), axis=0)
    hi = np.clip(np.searchsorted(z, want, side="right"), 1, len(z) - 1)
    lo = hi - 1
    w = ((want - z[lo]) / (z[hi] - z[lo])).astype(np.float32)
    out = resampled[lo] * (1.0 - w)[:, :, None, None] + resampled[hi] * w[:, :, None, None]
    return np.moveaxis(out, 1, -1)


def reference_windows(stacked, contract):
    parts = [np.clip((stacked - (w.level - w.width / 2.0)) * (1.0 / w.width), 0.0, 1.0) for w in contract.windows]
    return np.concatenate(parts, axis=-1).astype(np.float32, copy=False)


def assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


FIVE_OFFSETS = InputContract(height=40, width=56, pixel_spacing_mm=0.8, z_offsets_mm=(-3.0, -1.5, 0.0, 1.5, 3.0))


@pytest.mark.parametrize(("dtype", "spacing", "contract"), [
    (np.int16, (0.75, 0.75), InputContract(height=48, width=64)),  # the app: stored HU, fractional taps
    (np.int16, (1.0, 1.0), InputContract(height=48, width=64)),  # whole-pixel taps: plain copies
    (np.int16, (0.5, 2.0), InputContract(height=64, width=32)),  # anisotropic, partly outside the image
    (np.uint16, (0.9, 0.6), FIVE_OFFSETS),
    (np.float32, (0.7, 0.7), FIVE_OFFSETS),  # the training cache and the heatmap path
    (np.float64, (1.3, 0.8), InputContract(height=30, width=40)),
    (np.int32, (0.8, 0.8), InputContract(height=30, width=40)),
])
def test_optimised_contract_equals_the_reference(dtype, spacing, contract):
    rng = np.random.default_rng(7)
    vol = rng.integers(-1024, 3072, size=(6, 70, 90)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        vol += rng.normal(0.0, 0.5, vol.shape).astype(dtype)
    resampled = resample_inplane(vol, spacing, contract)
    assert_same(resampled, reference_resample(vol, spacing, contract))
    for z in (np.arange(6) * 2.57, np.arange(6) * 1.0, np.array([0.0, 0.7, 2.0, 4.5, 5.0, 9.0])):
        targets = np.concatenate([z, [z[0] - 3.0, z[-1] + 3.0, (z[1] + z[2]) / 2]])  # also beyond the ends
        for slices in (resampled, resampled.astype(np.float64)):
            stacked = reference_stack(slices, z, targets, contract)
            assert_same(stack_25d(slices, z, targets, contract), stacked)
            assert_same(apply_windows(stacked, contract), reference_windows(stacked, contract))
            assert_same(model_input(slices, z, targets, contract), reference_windows(stacked, contract))
        assert_same(model_input(list(resampled), z, targets, contract), model_input(resampled, z, targets, contract))
    assert_same(volume_to_input(vol, spacing, z, contract),
                reference_windows(reference_stack(reference_resample(vol, spacing, contract), z, z, contract), contract))


def test_optimised_contract_equals_the_reference_for_one_slice_and_raw_integers():
    rng = np.random.default_rng(3)
    one = rng.normal(0, 400, (1, 20, 30)).astype(np.float32)
    assert_same(model_input(one, [5.0], [5.0, 9.0], C), reference_windows(reference_stack(one, [5.0], [5.0, 9.0], C), C))
    raw = rng.integers(-1000, 2000, (3, 20, 30)).astype(np.int16)  # HU planes that skipped resampling
    for z in ([1.0], [0.0, 2.0, 4.0]):
        stacked = reference_stack(raw[:len(z)], z, [1.0, 3.3], C)
        assert_same(stack_25d(raw[:len(z)], z, [1.0, 3.3], C), stacked)
        assert_same(model_input(raw[:len(z)], z, [1.0, 3.3], C), reference_windows(stacked, C))


def test_model_input_writes_into_a_given_array_and_checks_it():
    rng = np.random.default_rng(5)
    planes = rng.normal(0, 500, (5, 16, 24)).astype(np.float32)
    z = np.arange(5) * 1.7
    out = np.full((3, 16, 24, C.channels), np.nan, np.float32)
    assert model_input(planes, z, z[1:4], C, out=out) is out
    np.testing.assert_array_equal(out, model_input(planes, z, z[1:4], C))
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array"):
        model_input(planes, z, z[1:4], C, out=np.empty((2, 16, 24, C.channels), np.float32))
    strided = np.empty((3, 16, 24, 2 * C.channels), np.float32)[..., ::2]  # right shape, but a view with gaps
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array"):
        model_input(planes, z, z[1:4], C, out=strided)


def test_model_input_from_two_threads_at_once_is_correct():
    # Each thread keeps its own scratch planes between calls.
    import threading

    rng = np.random.default_rng(6)
    volumes = [rng.normal(0, 600, (6, 20, 28)).astype(np.float32) for _ in range(2)]
    z = np.arange(6) * 2.57
    expected = [model_input(v, z, z, C) for v in volumes]  # computed alone, in this thread
    for v, want in zip(volumes, expected, strict=True):
        assert_same(want, reference_windows(reference_stack(v, z, z, C), C))
    failures = []

    def work(v, want):
        for _ in range(30):
            if not np.array_equal(model_input(v, z, z, C), want):
                failures.append(True)

    threads = [threading.Thread(target=work, args=pair) for pair in zip(volumes, expected, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
