"""The model input contract: CT Hounsfield units -> model input tensor.

One implementation, numpy only, shared by training, evaluation, compression
and the TensorFlow-free clinic app. The steps, in order:

1. in-plane resampling of each axial slice to ``pixel_spacing_mm`` on a fixed
   ``height`` x ``width`` grid centred on the reconstruction centre
   (outside the field of view counts as air, -1000 HU);
2. 2.5D stacking: for a target position z the slices at z + offset for each
   ``z_offsets_mm`` are linearly interpolated along z (edges clamp);
3. windowing: every window maps HU to [0, 1] (clipped); channels are ordered
   window-major, ``channel = window_index * len(z_offsets_mm) + offset_index``.

The tensor is NHWC float32. Rows run anterior -> posterior, columns right ->
left (the DICOM axial convention, ImageOrientationPatient 1/0/0/0/1/0).
"""

from __future__ import annotations

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
    windows: tuple[Window, ...] = field(default_factory=lambda: (Window(150.0, 700.0), Window(500.0, 1800.0)))
    layout: str = "NHWC"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.pixel_spacing_mm <= 0 or self.height <= 0 or self.width <= 0:
            raise ValueError("pixel spacing and input size must be positive")
        if not self.z_offsets_mm or not self.windows:
            raise ValueError("a contract needs at least one z offset and one window")

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
        d["windows"] = tuple(Window(float(w["level"]), float(w["width"])) for w in d["windows"])
        return cls(**d)


def _linear_taps(n_out: int, out_spacing: float, n_in: int, in_spacing: float) -> tuple[np.ndarray, ...]:
    """Source indices and weights for centre-aligned linear resampling of one axis.

    Returns (i0, i1, w1, inside): out = src[i0] * (1 - w1) + src[i1] * w1 where inside,
    air elsewhere.
    """
    # Positions in mm relative to the grid centre, then in source pixel units.
    out_mm = (np.arange(n_out, dtype=np.float64) - (n_out - 1) / 2.0) * out_spacing
    src = out_mm / in_spacing + (n_in - 1) / 2.0
    inside = (src >= -0.5) & (src <= n_in - 0.5)
    src = np.clip(src, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1, inside


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
    r0, r1, rw, rin = _linear_taps(contract.height, contract.pixel_spacing_mm, rows, row_mm)
    c0, c1, cw, cin = _linear_taps(contract.width, contract.pixel_spacing_mm, cols, col_mm)
    src = slices_hu.astype(np.float32, copy=False)
    # Separable: rows first (n, height, cols), then columns (n, height, width).
    tmp = src[:, r0, :] * (1.0 - rw)[None, :, None] + src[:, r1, :] * rw[None, :, None]
    out = tmp[:, :, c0] * (1.0 - cw) + tmp[:, :, c1] * cw
    out[:, ~rin, :] = AIR_HU
    out[:, :, ~cin] = AIR_HU
    return out


def stack_25d(resampled_hu: np.ndarray, z_mm: np.ndarray, target_z_mm: np.ndarray, contract: InputContract) -> np.ndarray:
    """Interpolate neighbouring slices for each target z: (m, height, width, n_offsets) in HU.

    ``z_mm`` must be strictly increasing (position along the slice normal).
    """
    z_mm = np.asarray(z_mm, dtype=np.float64)
    target_z_mm = np.atleast_1d(np.asarray(target_z_mm, dtype=np.float64))
    if len(z_mm) != len(resampled_hu):
        raise ValueError("one z position per slice is required")
    if len(z_mm) > 1 and np.any(np.diff(z_mm) <= 0):
        raise ValueError("slice positions must be strictly increasing")
    offsets = np.asarray(contract.z_offsets_mm, dtype=np.float64)
    want = np.clip(target_z_mm[:, None] + offsets[None, :], z_mm[0], z_mm[-1])  # (m, k)
    if len(z_mm) == 1:
        return np.repeat(resampled_hu[:1, :, :, None], len(offsets), axis=3).repeat(len(target_z_mm), axis=0)
    hi = np.clip(np.searchsorted(z_mm, want, side="right"), 1, len(z_mm) - 1)
    lo = hi - 1
    w = ((want - z_mm[lo]) / (z_mm[hi] - z_mm[lo])).astype(np.float32)
    a = resampled_hu[lo]  # (m, k, h, w)
    b = resampled_hu[hi]
    out = a * (1.0 - w)[:, :, None, None] + b * w[:, :, None, None]
    return np.moveaxis(out, 1, -1)


def apply_windows(stacked_hu: np.ndarray, contract: InputContract) -> np.ndarray:
    """Window 2.5D HU stacks (m, h, w, n_offsets) into the model input (m, h, w, channels) float32."""
    parts = []
    for win in contract.windows:
        low = win.level - win.width / 2.0
        parts.append(np.clip((stacked_hu - low) * (1.0 / win.width), 0.0, 1.0))
    return np.concatenate(parts, axis=-1).astype(np.float32, copy=False)


def model_input(resampled_hu: np.ndarray, z_mm: np.ndarray, target_z_mm: np.ndarray, contract: InputContract) -> np.ndarray:
    """Model input for target positions, from slices already on the contract grid."""
    return apply_windows(stack_25d(resampled_hu, z_mm, target_z_mm, contract), contract)


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


def iter_input_batches(
    resampled_hu: np.ndarray, z_mm: np.ndarray, contract: InputContract, batch_size: int = 16
) -> Iterator[tuple[slice, np.ndarray]]:
    """Stream model inputs, one batch of slice positions at a time, so memory stays bounded."""
    z_mm = np.asarray(z_mm, dtype=np.float64)
    for start in range(0, len(z_mm), batch_size):
        sl = slice(start, min(start + batch_size, len(z_mm)))
        yield sl, model_input(resampled_hu, z_mm, z_mm[sl], contract)
