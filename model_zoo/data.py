"""tf.data pipelines over prepared phantom studies (training side of the input contract).

Every example is built by the numpy contract (``stack_25d`` -> ``apply_windows``);
augmentation acts on the 2.5D HU stack before windowing, so HU/contrast jitter
behave like a different scanner calibration rather than a different window.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

from model_zoo.contract import AIR_HU, InputContract, apply_windows, model_input, stack_25d  # noqa: E402
from model_zoo.dataset import PreparedStudy  # noqa: E402
from model_zoo.litert import OUTPUTS  # noqa: E402

PROBABILITY, CAM = OUTPUTS


@dataclass(frozen=True)
class Augmentation:
    flip_lr: bool = True
    max_rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    hu_offset_sd: float = 10.0
    contrast_range: tuple[float, float] = (0.93, 1.07)
    noise_sd_max: float = 15.0

    @classmethod
    def from_dict(cls, d: dict | None) -> Augmentation | None:
        if d is None:
            return None
        d = dict(d)
        for key in ("scale_range", "contrast_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


LESION_MAP = "lesion_map"  # the training-only fine lesion-map output (deep supervision)
# The backbones' last feature map (and the CAM) is 1/32 of the input in each direction.
CAM_STRIDE = 32


# Standard normal draws shared by all examples: white-noise augmentation reads a random window
# of it instead of drawing ~100k normals per example (2 ms, a fifth of the pipeline's cost).
_NOISE = np.random.default_rng(20261128).standard_normal(1 << 22, dtype=np.float32)


def _white_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape))
    start = int(rng.integers(0, _NOISE.size - n))
    return _NOISE[start:start + n].reshape(shape)


def _warp(image: np.ndarray, matrix: np.ndarray, interpolation: int, fill: float) -> np.ndarray:
    """Resample (H, W[, C]) at ``matrix @ (x, y, 1)`` for every output pixel (OpenCV: ~10x scipy's speed)."""
    h, w = image.shape[:2]
    flags = interpolation | cv2.WARP_INVERSE_MAP
    if image.ndim == 3 and image.shape[2] > 4:  # OpenCV warps at most 4 channels at a time
        return np.stack([_warp(image[..., i], matrix, interpolation, fill) for i in range(image.shape[2])], axis=-1)
    return cv2.warpAffine(image, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(fill,) * 4).reshape(image.shape)


def augment(stack_hu: np.ndarray, mask: np.ndarray, aug: Augmentation,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random geometric + intensity augmentation of one 2.5D HU stack (H, W, n_offsets) and its lesion mask."""
    h, w, _ = stack_hu.shape
    out = np.ascontiguousarray(stack_hu, dtype=np.float32)
    angle = np.deg2rad(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
    scale = rng.uniform(*aug.scale_range)
    if abs(angle) > 1e-3 or abs(scale - 1.0) > 1e-3:
        # Output pixel (x, y) samples the input at centre + R(angle) / scale @ ((x, y) - centre).
        c, s = np.cos(angle) / scale, np.sin(angle) / scale
        rotation = np.array([[c, s], [-s, c]])
        centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        matrix = np.hstack([rotation, (centre - rotation @ centre)[:, None]])
        out = _warp(out, matrix, cv2.INTER_LINEAR, AIR_HU)
        mask = _warp(mask.astype(np.uint8), matrix, cv2.INTER_NEAREST, 0) > 0
    if aug.flip_lr and rng.random() < 0.5:
        out, mask = out[:, ::-1, :], mask[:, ::-1]
    contrast = rng.uniform(*aug.contrast_range)
    out = out * np.float32(contrast) + np.float32(rng.normal(0.0, aug.hu_offset_sd))
    if aug.noise_sd_max > 0:
        out += np.float32(rng.uniform(0.0, aug.noise_sd_max)) * _white_noise(out.shape, rng)
    return out.astype(np.float32, copy=False), mask


def lesion_grid(mask: np.ndarray, stride: int = CAM_STRIDE) -> np.ndarray:
    """Lesion mask (H, W) -> (H/stride, W/stride, 1) float: a cell is 1 if any lesion pixel falls in it."""
    h, w = mask.shape
    cells = mask.reshape(h // stride, stride, w // stride, stride).any(axis=(1, 3))
    return cells[..., None].astype(np.float32)


def make_example(study: PreparedStudy, slice_index: int, contract: InputContract) -> np.ndarray:
    """One model input (H, W, C) for one slice of a prepared study: exactly the app's tensor."""
    return model_input(study.resampled_hu, study.z_mm, study.z_mm[slice_index:slice_index + 1], contract)[0]


# Extra rows/columns cut around a training crop so that rotation (<= 8 deg) and scaling
# (>= 0.9) of the patch never bring air in from outside it: half-diagonal geometry of 128 x 160.
AUGMENT_MARGIN = 24


def _random_bone_pixel(centre_hu: np.ndarray, rng: np.random.Generator, tries: int = 512) -> np.ndarray | None:
    """A random pixel above 250 HU (bone) by rejection sampling; None if none is found."""
    h, w = centre_hu.shape
    points = np.stack([rng.integers(0, h, tries), rng.integers(0, w, tries)], axis=1)
    hits = points[centre_hu[points[:, 0], points[:, 1]] > 250]
    return hits[0] if len(hits) else None


def crop_window(mask: np.ndarray, centre_hu: np.ndarray, crop: tuple[int, int],
                rng: np.random.Generator, margin: int = 0, bone_fraction: float = 0.6,
                hot_spot: tuple[int, int] | None = None) -> tuple[slice, slice]:
    """Where to cut a training crop (plus ``margin`` on every side): around a lesion when there
    is one, else around ``hot_spot`` if given (a mined false-positive cell), else around bone
    (``bone_fraction``) or anywhere.

    Lesions live in bone, so most negative crops are centred on bone: the network has to tell
    lesions from normal and abnormal-but-benign bone. The rest cover the table, lungs and soft
    tissue, whose cells a whole slice also contains.
    """
    h, w = mask.shape
    ch, cw = crop[0] + 2 * margin, crop[1] + 2 * margin
    if ch > h or cw > w:
        raise ValueError(f"a {crop} crop with a {margin} px margin does not fit the {h} x {w} grid")
    lesion_pixels = np.argwhere(mask)
    if len(lesion_pixels):
        centre = lesion_pixels[rng.integers(len(lesion_pixels))]
    elif hot_spot is not None:
        centre = np.asarray(hot_spot)
    elif rng.random() < bone_fraction:
        centre = _random_bone_pixel(centre_hu, rng)
    else:
        centre = None
    if centre is not None:
        cy = centre[0] + rng.integers(-(crop[0] // 2 - CAM_STRIDE // 2), crop[0] // 2 - CAM_STRIDE // 2 + 1)
        cx = centre[1] + rng.integers(-(crop[1] // 2 - CAM_STRIDE // 2), crop[1] // 2 - CAM_STRIDE // 2 + 1)
    else:
        cy, cx = rng.integers(0, h), rng.integers(0, w)
    top = int(np.clip(cy - ch // 2, 0, h - ch))
    left = int(np.clip(cx - cw // 2, 0, w - cw))
    return slice(top, top + ch), slice(left, left + cw)


def make_training_pair(study: PreparedStudy, slice_index: int, contract: InputContract,
                       aug: Augmentation | None, rng: np.random.Generator,
                       crop: tuple[int, int] | None = None,
                       hot_spot: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An (augmented, optionally cropped) input (H, W, C) and its lesion mask (H, W).

    With ``crop`` only a patch around the crop (plus AUGMENT_MARGIN when augmenting) is
    stacked and augmented, then its centre kept: the same pixels as augmenting the whole
    slice first, at a third of the cost (the input pipeline, not the network, limited
    training speed on 2 cores). ``hot_spot`` (row, col) centres the crop of a lesion-free slice.
    """
    mask = study.lesion_mask[slice_index]
    target_z = study.z_mm[slice_index:slice_index + 1]
    if crop is None:
        stack = stack_25d(study.resampled_hu, study.z_mm, target_z, contract)[0]
        if aug is not None:
            stack, mask = augment(stack, mask, aug, rng)
        return apply_windows(stack[None], contract)[0], mask
    h, w = mask.shape
    margin = min(AUGMENT_MARGIN, (h - crop[0]) // 2, (w - crop[1]) // 2) if aug is not None else 0
    rows, cols = crop_window(mask, study.resampled_hu[slice_index], crop, rng, margin, hot_spot=hot_spot)
    stack = stack_25d(study.resampled_hu[:, rows, cols], study.z_mm, target_z, contract)[0]
    mask = mask[rows, cols]
    if aug is not None:
        stack, mask = augment(stack, mask, aug, rng)
    keep = (slice(margin, margin + crop[0]), slice(margin, margin + crop[1]))
    return apply_windows(stack[keep][None], contract)[0], mask[keep]


def without_faint_lesions(study: PreparedStudy, min_area_px: int) -> PreparedStudy:
    """The study as training sees it: lesion cross-sections under ``min_area_px`` pixels are
    dropped from each slice's mask, and a lesion slice left with none becomes ambiguous (-1).

    A lesion slice is any slice within 0.75 of a lesion's radius of its centre, whatever the
    cross-section there, and the mask keeps only pixels that are lesion and bone (some lesion
    slices have none on the contract grid). In the training split a quarter of the lesion slices
    showed less than a 5 mm disc, mostly lost in the noise: trained as positives, they teach the
    network to fire on plain bone texture, which is where its false positives are. A faint
    cross-section beside a visible lesion leaves the mask, so its cells count as lesion-free, as
    they look. Evaluation labels are not touched: a study with a lesion is positive.
    """
    if study.lesion_mask is None or not (study.slice_labels == 1).any():
        return study  # nothing to drop; the mask of a lesion-free study stays a shared view
    mask, labels = study.lesion_mask.copy(), study.slice_labels.copy()
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        components, _ = ndimage.label(mask[k])
        faint = np.bincount(components.ravel()) < min_area_px
        faint[0] = False  # background
        mask[k][faint[components]] = False
    labels[(labels == 1) & ~mask.any(axis=(1, 2))] = -1
    return replace(study, lesion_mask=mask, slice_labels=labels)


def labelled_slices(studies: Sequence[PreparedStudy]) -> tuple[np.ndarray, np.ndarray]:
    """(study, slice) index pairs of unambiguous slices, split into positives and negatives."""
    pairs = [(s, k, int(lab)) for s, st in enumerate(studies) for k, lab in enumerate(st.slice_labels) if lab >= 0]
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    return arr[arr[:, 2] == 1, :2], arr[arr[:, 2] == 0, :2]


def osteoporosis_groups(pool: np.ndarray, studies: Sequence[PreparedStudy],
                        fraction: float | None) -> tuple[list[np.ndarray], np.ndarray]:
    """(groups of (study, slice) pairs, probability of drawing from each group).

    Osteoporotic bone - low density, coarse texture, thin cortex - is where the model's
    false positives concentrate (as for classic CAD), and only about a quarter of the
    studies have it, so training can over-sample it. ``None``: one group, no re-weighting.
    """
    if fraction is None:
        return [pool], np.array([1.0])
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"osteoporotic_fraction must lie strictly between 0 and 1, got {fraction}")
    weak = np.array([bool(studies[int(s)].truth.get("osteoporotic", False)) for s in pool[:, 0]], dtype=bool)
    groups = [pool[weak], pool[~weak]]
    if not all(len(g) for g in groups):
        return [pool], np.array([1.0])
    return groups, np.array([fraction, 1.0 - fraction])


def make_train_dataset(studies: Sequence[PreparedStudy], contract: InputContract, batch_size: int,
                       aug: Augmentation | None, seed: int, positive_fraction: float = 0.35,
                       lesion_map: bool = True, crop: tuple[int, int] | None = None,
                       fine_stride: int | None = None, osteoporotic_fraction: float | None = None,
                       hard_negatives: np.ndarray | None = None, hard_negative_fraction: float = 0.0,
                       first_example: int = 0) -> tf.data.Dataset:
    """An endless, seeded stream of (image, {"probability": label, "cam": lesion grid}) batches.

    Positive slices are rare, so each example is positive with ``positive_fraction``
    (class-balanced sampling); per-example augmentation seeds make the stream
    reproducible whatever the thread order. ``lesion_map=False`` drops the cam target
    (label-only fine-tuning). ``crop`` (rows, cols) trains on crops around lesions and
    bone: the network is fully convolutional up to the max pooling, so it computes the
    same cam cells on the whole contract grid, at a quarter of the cost to train.
    ``fine_stride`` adds the lesion grid at that stride as target ``lesion_map`` (deep
    supervision of a training-only head, see ``model_zoo.train``). ``osteoporotic_fraction``
    draws that share of the positive and of the negative examples from osteoporotic studies
    (default: in proportion to their slices). ``hard_negatives`` (rows of study, slice, row,
    col: where the model fired on lesion-free slices, see ``model_zoo.train.mine_hard_negatives``)
    supply ``hard_negative_fraction`` of the negative examples, cropped around that spot.
    ``first_example`` starts the stream that far in (a resumed run: the same examples as a
    run that was never stopped).
    """
    positives, negatives = labelled_slices(studies)
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("training needs both positive and negative slices")
    if not 0.0 <= hard_negative_fraction < 1.0:
        raise ValueError(f"hard_negative_fraction must lie in [0, 1), got {hard_negative_fraction}")
    if hard_negative_fraction and (hard_negatives is None or len(hard_negatives) == 0):
        raise ValueError("hard_negative_fraction needs mined hard negatives")
    pools = [osteoporosis_groups(pool, studies, osteoporotic_fraction) for pool in (positives, negatives)]

    def index_stream():
        rng = np.random.default_rng(seed)
        n = 0
        while True:
            row = col = -1
            if rng.random() < positive_fraction:
                groups, weights = pools[0]
            elif hard_negative_fraction and rng.random() < hard_negative_fraction:  # draws only if enabled: old seeds replay
                groups, weights = [hard_negatives], np.array([1.0])
            else:
                groups, weights = pools[1]
            pool = groups[rng.choice(len(groups), p=weights)]
            s, k, *spot = pool[rng.integers(len(pool))]
            if spot:
                row, col = spot
            if n >= first_example:
                yield np.int64(s), np.int64(k), np.int64(seed * 1_000_003 + n), np.int64(row), np.int64(col)
            n += 1

    height, width = crop or (contract.height, contract.width)
    fine = fine_stride or CAM_STRIDE

    def build(s, k, example_seed, row, col):
        study = studies[int(s)]
        hot_spot = (int(row), int(col)) if row >= 0 else None
        x, mask = make_training_pair(study, int(k), contract, aug, np.random.default_rng(int(example_seed)), crop,
                                     hot_spot)
        grid = lesion_grid(mask)
        fine_grid = lesion_grid(mask, fine_stride) if fine_stride else grid
        return x, grid, fine_grid, np.float32(study.slice_labels[int(k)] == 1)

    def tf_build(s, k, example_seed, row, col):
        x, grid, fine_grid, y = tf.numpy_function(build, [s, k, example_seed, row, col], [tf.float32] * 4)
        x.set_shape((height, width, contract.channels))
        grid.set_shape((height // CAM_STRIDE, width // CAM_STRIDE, 1))
        fine_grid.set_shape((height // fine, width // fine, 1))
        y.set_shape(())
        targets = {PROBABILITY: tf.reshape(y, (1,))}
        if lesion_map:
            targets[CAM] = grid
        if fine_stride:
            targets[LESION_MAP] = fine_grid
        return x, targets

    spec = (tf.TensorSpec((), tf.int64),) * 5
    ds = tf.data.Dataset.from_generator(index_stream, output_signature=spec)
    ds = ds.map(tf_build, num_parallel_calls=2, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)
