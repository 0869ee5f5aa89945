import numpy as np
import pytest

from model_zoo.contract import (
    AIR_HU,
    InputContract,
    Window,
    apply_windows,
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


def test_batches_equal_whole_volume():
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, (7, 60, 70)).astype(np.float32)
    z = np.cumsum(rng.uniform(1, 3, 7))
    small = InputContract(height=32, width=64)
    whole = volume_to_input(vol, (0.8, 0.8), z, small)
    resampled = resample_inplane(vol, (0.8, 0.8), small)
    parts = np.concatenate([x for _, x in iter_input_batches(resampled, z, small, batch_size=3)])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(whole, model_input(resampled, z, z, small))
