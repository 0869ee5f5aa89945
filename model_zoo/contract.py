"""The model input contract: CT Hounsfield units -> model input tensor.

One implementation, numpy only, shared by training, evaluation, compression
and the TensorFlow-free clinic app. The steps, in order:

1. in-plane resampling of each axial slice to ``pixel_spacing_mm`` on a fixed
   ``height`` x ``width`` grid centred on the reconstruction centre
   (outside the field of view counts as air, -1000 HU);
2. 2.5D stacking: for a target position z the slices at z + offset for each
   ``z_offsets_mm`` are linearly interpolated along z (edges clamp);
3. windowing: every window maps HU to [0, 1] (clipped); channels are ordered
   window-major, ``channel = window_index * len(z_offsets_mm) + offset_index``;
4. the analysed slices (``analysed_slices``): thin-slice series are analysed on slices
   about ``z_step_mm`` apart, because 2.5D inputs closer than that mostly repeat each
   other; the slices in between get probabilities interpolated along z
   (``interpolate_to_slices``). Evaluation and the app analyse the same slices.

The tensor is NHWC float32. Rows run anterior -> posterior, columns right ->
left (the DICOM axial convention, ImageOrientationPatient 1/0/0/0/1/0).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

AIR_HU = -1000.0


@dataclass(frozen=True)
class Window:
    """A display window: HU in [level - width/2, level + width/2] maps to [0, 1]."""

    level: float
    width: float

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"window width must be positive, got {self.width}")


@dataclass(frozen=True)
class InputContract:
    """Everything a model needs to know about its input; stored in the model card."""

    pixel_spacing_mm: float = 1.0
    height: int = 256
    width: int = 320
    z_offsets_mm: tuple[float, ...] = (-2.0, 0.0, 2.0)
    z_step_mm: float = 2.0
    windows: tuple[Window, ...] = field(default_factory=lambda: (Window(150.0, 700.0), Window(500.0, 1800.0)))
    layout: str = "NHWC"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.pixel_spacing_mm <= 0 or self.height <= 0 or self.width <= 0:
            raise ValueError("pixel spacing and input size must be positive")
        if not self.z_offsets_mm or not self.windows:
            raise ValueError("a contract needs at least one z offset and one window")
        if self.z_step_mm < 0:
            raise ValueError(f"z_step_mm must be >= 0 (0: analyse every slice), got {self.z_step_mm}")

    @property
    def channels(self) -> int:
        return len(self.z_offsets_mm) * len(self.windows)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["z_offsets_mm"] = list(self.z_offsets_mm)
        d["windows"] = [asdict(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputContract:
        d = dict(d)
        d["z_offsets_mm"] = tuple(float(z) for z in d["z_offsets_mm"])
        if "z_step_mm" in d:
            d["z_step_mm"] = float(d["z_step_mm"])
        d["windows"] = tuple(Window(float(w["level"]), float(w["width"])) for w in d["windows"])
        return cls(**d)


@dataclass(frozen=True)
class _AxisTaps:
    """Centre-aligned linear resampling of one axis.

    Outputs ``start:stop`` lie inside the source: out = src[i0] * w0 + src[i1] * w1 there
    (all float32, w0 = 1 - w1); the others are air. ``integral`` when every w1 is 0, so
    the output is a plain copy of src[i0] (pixel spacing a whole multiple of the grid's).
    """

    start: int
    stop: int
    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    integral: bool


@functools.lru_cache(maxsize=64)
def _linear_taps(n_out: int, out_spacing: float, n_in: int, in_spacing: float) -> _AxisTaps:
    """The taps of one axis; cached because every slice of a series shares them (read-only arrays)."""
    # Positions in mm relative to the grid centre, then in source pixel units.
    out_mm = (np.arange(n_out, dtype=np.float64) - (n_out - 1) / 2.0) * out_spacing
    src = out_mm / in_spacing + (n_in - 1) / 2.0
    inside = np.flatnonzero((src >= -0.5) & (src <= n_in - 0.5))  # one run: src increases
    start, stop = (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)
    src = np.clip(src[start:stop], 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    w0 = np.float32(1.0) - w1
    for array in (i0, i1, w0, w1):
        array.setflags(write=False)
    return _AxisTaps(start, stop, i0, i1, w0, w1, integral=not w1.any())


def _float32_source(plane: np.ndarray) -> np.ndarray:
    """``plane`` itself when float32 arithmetic on it is exact (float32, 8/16-bit integers), else a float32 copy."""
    if plane.dtype == np.float32 or (plane.dtype.kind in "iub" and plane.dtype.itemsize <= 2):
        return plane
    return plane.astype(np.float32)


def resample_inplane(slices_hu: np.ndarray, pixel_spacing_mm: Sequence[float], contract: InputContract) -> np.ndarray:
    """Resample axial slices (n, rows, cols) in HU to the contract grid (n, height, width) float32.

    ``pixel_spacing_mm`` is DICOM PixelSpacing order: (row spacing, column spacing).
    """
    slices_hu = np.asarray(slices_hu)
    if slices_hu.ndim == 2:
        slices_hu = slices_hu[None]
    if slices_hu.ndim != 3:
        raise ValueError(f"expected (n, rows, cols) slices, got shape {slices_hu.shape}")
    n, rows, cols = slices_hu.shape
    row_mm, col_mm = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
    r = _linear_taps(contract.height, float(contract.pixel_spacing_mm), rows, row_mm)
    c = _linear_taps(contract.width, float(contract.pixel_spacing_mm), cols, col_mm)
    out = np.full((n, contract.height, contract.width), AIR_HU, np.float32)
    if r.start == r.stop or c.start == c.stop:
        return out
    # Separable, rows first then columns (the order fixes the float32 rounding). Slice by
    # slice, so the temporaries stay in cache; the row pass converts only the source rows
    # and columns the grid uses, straight from the stored integers.
    first_col, end_col = int(c.i0[0]), int(c.i1[-1]) + 1
    c0, c1 = c.i0 - first_col, c.i1 - first_col
    row_pass = np.empty((r.stop - r.start, end_col - first_col), np.float32)
    row_part = np.empty_like(row_pass)
    col_a = np.empty((r.stop - r.start, c.stop - c.start), np.float32)
    col_b = np.empty_like(col_a)
    rw0, rw1 = r.w0[:, None], r.w1[:, None]
    for s in range(n):
        src = _float32_source(slices_hu[s, :, first_col:end_col])
        if r.integral:
            np.copyto(row_pass, src[r.i0])
        else:
            np.multiply(src[r.i0], rw0, out=row_pass, dtype=np.float32)
            np.multiply(src[r.i1], rw1, out=row_part, dtype=np.float32)
            np.add(row_pass, row_part, out=row_pass)
        dst = out[s, r.start:r.stop, c.start:c.stop]
        np.take(row_pass, c0, axis=1, out=col_a)
        if c.integral:
            dst[...] = col_a
        else:
            np.take(row_pass, c1, axis=1, out=col_b)
            np.multiply(col_a, c.w0, out=col_a)
            np.multiply(col_b, c.w1, out=col_b)
            np.add(col_a, col_b, out=dst)
    return out


def _z_taps(n_slices: int, z_mm: np.ndarray, target_z_mm: np.ndarray,
            contract: InputContract) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each target and z offset the neighbouring slices and the weight of the upper one.

    Returns (lo, hi, w), each (m, n_offsets): HU = slice[lo] * (1 - w) + slice[hi] * w,
    with w float32 and positions beyond the first or last slice clamped to it.
    """
    z_mm = np.asarray(z_mm, dtype=np.float64)
    target_z_mm = np.atleast_1d(np.asarray(target_z_mm, dtype=np.float64))
    if len(z_mm) != n_slices:
        raise ValueError("one z position per slice is required")
    if n_slices == 0:
        raise ValueError("at least one slice is required")
    if n_slices > 1 and np.any(np.diff(z_mm) <= 0):
        raise ValueError("slice positions must be strictly increasing")
    offsets = np.asarray(contract.z_offsets_mm, dtype=np.float64)
    want = np.clip(target_z_mm[:, None] + offsets[None, :], z_mm[0], z_mm[-1])  # (m, k)
    if n_slices == 1:
        zeros = np.zeros(want.shape, np.intp)
        return zeros, zeros, np.zeros(want.shape, np.float32)
    hi = np.clip(np.searchsorted(z_mm, want, side="right"), 1, n_slices - 1)
    lo = hi - 1
    w = ((want - z_mm[lo]) / (z_mm[hi] - z_mm[lo])).astype(np.float32)
    return lo, hi, w


def _z_plane(slices: Sequence[np.ndarray], lo: int, hi: int, w: np.float32, out: np.ndarray,
             part: np.ndarray) -> np.ndarray:
    """The HU plane between slices ``lo`` and ``hi``: slices[lo] * (1 - w) + slices[hi] * w.

    A weight of exactly 0 or 1 returns the slice itself (the same values, no arithmetic);
    otherwise the plane is computed into ``out`` (``part``: scratch of the same shape and dtype).
    """
    if w == 0:
        return slices[lo]
    if w == 1:
        return slices[hi]
    np.multiply(slices[lo], np.float32(1.0) - w, out=out, dtype=out.dtype)
    np.multiply(slices[hi], w, out=part, dtype=out.dtype)
    return np.add(out, part, out=out)


def _stack_dtype(slices: Sequence[np.ndarray]) -> np.dtype:
    """The dtype NumPy gives ``slice * float32 weights``: float32 for float32 and 16-bit input.

    A single slice is returned as it is (no interpolation), in its own dtype.
    """
    dtype = np.asarray(slices[0]).dtype
    return dtype if len(slices) == 1 else np.result_type(dtype, np.float32)


def _window_dtype(stack_dtype: np.dtype) -> np.dtype:
    """The dtype NumPy gives ``stack - level`` for a Python float level: float32 stays float32."""
    return np.result_type(stack_dtype, 0.0)


def stack_25d(resampled_hu: np.ndarray, z_mm: np.ndarray, target_z_mm: np.ndarray, contract: InputContract) -> np.ndarray:
    """Interpolate neighbouring slices for each target z: (m, height, width, n_offsets) in HU.

    ``z_mm`` must be strictly increasing (position along the slice normal).
    """
    lo, hi, w = _z_taps(len(resampled_hu), z_mm, target_z_mm, contract)
    shape = np.shape(resampled_hu[0])
    dtype = _stack_dtype(resampled_hu)
    out = np.empty((len(lo), *shape, lo.shape[1]), dtype)
    plane, part = np.empty(shape, dtype), np.empty(shape, dtype)
    for i, k in np.ndindex(lo.shape):
        out[i, ..., k] = _z_plane(resampled_hu, lo[i, k], hi[i, k], w[i, k], plane, part)
    return out


def _window_into(plane: np.ndarray, win: Window, out: np.ndarray) -> None:
    """``out`` = clip((plane - low) / width, 0, 1), rounded like NumPy does it in ``out.dtype``."""
    dtype = out.dtype.type
    np.subtract(plane, dtype(win.level - win.width / 2.0), out=out, dtype=out.dtype)
    np.multiply(out, dtype(1.0 / win.width), out=out)
    np.clip(out, dtype(0.0), dtype(1.0), out=out)


def apply_windows(stacked_hu: np.ndarray, contract: InputContract) -> np.ndarray:
    """Window 2.5D HU stacks (m, h, w, n_offsets) into the model input (m, h, w, channels) float32."""
    stacked_hu = np.asarray(stacked_hu)
    n_offsets = stacked_hu.shape[-1]
    out = np.empty((*stacked_hu.shape[:-1], n_offsets * len(contract.windows)), np.float32)
    plane = np.empty(stacked_hu.shape[:-1], _window_dtype(stacked_hu.dtype))
    for k in range(n_offsets):
        for j, win in enumerate(contract.windows):
            _window_into(stacked_hu[..., k], win, plane)
            out[..., j * n_offsets + k] = plane
    return out


# Multiply-adds per matrix product in ``model_input``: OpenBLAS computes products up to
# 2**18 in the calling thread and spreads larger ones over threads, which spin on the
# cores the pipeline and the interpreter need (measured: three times the CPU time).
# Small blocks are also still in cache for the clip.
_SINGLE_THREAD_PRODUCT = 2**18


@functools.lru_cache(maxsize=16)
def _window_matrix(windows: tuple[Window, ...], n_offsets: int) -> np.ndarray:
    """(n_offsets + 1, channels) float32 mapping the HU planes of a target plus a row of ones
    to the unclipped channels: channel j * n_offsets + k = plane_k / width_j - low_j / width_j."""
    matrix = np.zeros((n_offsets + 1, n_offsets * len(windows)), np.float64)
    for j, win in enumerate(windows):
        for k in range(n_offsets):
            matrix[k, j * n_offsets + k] = 1.0 / win.width
            matrix[n_offsets, j * n_offsets + k] = -(win.level - win.width / 2.0) / win.width
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


class _TargetPlanes:
    """Scratch for ``model_input``: the HU planes of one target plus a plane of ones, and a spare plane."""

    def __init__(self, shape: tuple[int, ...], n_offsets: int):
        self.key = (shape, n_offsets)
        self.stack = np.empty((n_offsets + 1, *shape), np.float32)
        self.stack[n_offsets] = 1.0
        self.part = np.empty(shape, np.float32)


_thread_scratch = threading.local()


def _target_planes(shape: tuple[int, ...], n_offsets: int) -> _TargetPlanes:
    """This thread's scratch, kept between calls: fresh megabyte buffers on every call
    cost more in page faults than the arithmetic (measured: a third of ``model_input``)."""
    planes = getattr(_thread_scratch, "planes", None)
    if planes is None or planes.key != (shape, n_offsets):
        planes = _thread_scratch.planes = _TargetPlanes(shape, n_offsets)
    return planes


def model_input(resampled_hu: np.ndarray, z_mm: np.ndarray, target_z_mm: np.ndarray, contract: InputContract,
                *, out: np.ndarray | None = None) -> np.ndarray:
    """Model input for target positions, from slices already on the contract grid.

    The values of ``apply_windows(stack_25d(...))`` up to float32 rounding (within 1e-6),
    built one target at a time: its interpolated HU planes (in float32) and a plane of
    ones are mapped to all channels by one matrix product, written straight into the
    NHWC output, then clipped. (Windowing plane by plane and interleaving the channels
    cost three times as much.) ``resampled_hu`` may also be a sequence of (height, width)
    planes. ``out``, a C-contiguous float32 (m, height, width, channels) array, receives
    the result instead of a new array (a caller that reuses its buffers saves their page faults).
    """
    lo, hi, w = _z_taps(len(resampled_hu), z_mm, target_z_mm, contract)
    n_offsets = lo.shape[1]
    shape = np.shape(resampled_hu[0])
    want = (len(lo), *shape, contract.channels)
    if out is None:
        out = np.empty(want, np.float32)
    elif out.shape != want or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {want}, got {out.dtype} {out.shape}")
    scratch = _target_planes(shape, n_offsets)
    planes = scratch.stack.reshape(n_offsets + 1, -1).T  # (pixels, n_offsets + 1), a view
    matrix = _window_matrix(contract.windows, n_offsets)
    block_pixels = max(1, _SINGLE_THREAD_PRODUCT // matrix.size)
    for i in range(len(lo)):
        for k in range(n_offsets):
            row = scratch.stack[k]
            plane = _z_plane(resampled_hu, lo[i, k], hi[i, k], w[i, k], row, scratch.part)
            if plane is not row:  # an exact slice, returned as it is
                np.copyto(row, plane, casting="same_kind")
        target = out[i].reshape(-1, contract.channels)
        for start in range(0, len(target), block_pixels):
            block = target[start:start + block_pixels]
            np.matmul(planes[start:start + block_pixels], matrix, out=block)
            np.clip(block, np.float32(0.0), np.float32(1.0), out=block)
    return out


def volume_to_input(
    volume_hu: np.ndarray,
    pixel_spacing_mm: Sequence[float],
    z_mm: np.ndarray,
    contract: InputContract,
    target_z_mm: np.ndarray | None = None,
) -> np.ndarray:
    """The whole contract in one call: HU volume (n, rows, cols) -> model input (m, h, w, c).

    By default one input per slice of the volume (target positions = slice positions).
    """
    resampled = resample_inplane(volume_hu, pixel_spacing_mm, contract)
    targets = np.asarray(z_mm) if target_z_mm is None else target_z_mm
    return model_input(resampled, z_mm, targets, contract)


def analysed_slices(z_mm: np.ndarray, contract: InputContract) -> np.ndarray:
    """Indices of the slices the model runs on: increasing, always the first and the last.

    A slice is analysed when it lies at least 3/4 of ``z_step_mm`` above the previous
    analysed one, so analysed slices are at most 1.5 steps apart and a series whose
    spacing is already that coarse is analysed whole (as is any with ``z_step_mm`` 0).
    """
    z = np.asarray(z_mm, dtype=np.float64)
    n = len(z)
    if contract.z_step_mm <= 0 or n < 3:
        return np.arange(n)
    min_gap = 0.75 * contract.z_step_mm - 1e-6  # tolerance: positions come from decimal strings
    picked = [0]
    for i in range(1, n - 1):
        if z[i] - z[picked[-1]] >= min_gap:
            picked.append(i)
    picked.append(n - 1)
    return np.asarray(picked, dtype=np.intp)


def interpolate_to_slices(z_mm: np.ndarray, analysed: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-slice values from those of the analysed slices: linear in z between analysed neighbours."""
    z = np.asarray(z_mm, dtype=np.float64)
    return np.interp(z, z[analysed], np.asarray(values, dtype=np.float64))


def iter_input_batches(
    resampled_hu: np.ndarray, z_mm: np.ndarray, contract: InputContract, batch_size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream the model inputs of the analysed slices, a batch at a time, so memory stays bounded.

    Yields (slice indices, inputs (m, h, w, c)).
    """
    z_mm = np.asarray(z_mm, dtype=np.float64)
    analysed = analysed_slices(z_mm, contract)
    for start in range(0, len(analysed), batch_size):
        indices = analysed[start:start + batch_size]
        yield indices, model_input(resampled_hu, z_mm, z_mm[indices], contract)
