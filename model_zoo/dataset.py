"""Phantom studies prepared through the input contract, with a disk cache (numpy only).

A data split is a list of studies drawn from the phantom generator by (seed, index);
different splits use different seeds, so no study is in two splits. Each prepared
study keeps its slices resampled onto the contract grid, its slice positions and
labels, and the study truth; the 2.5D stacking and windowing happen later through the
same contract functions the app uses. A cache entry is a .npz (positions, labels, truth,
packed lesion mask) and a .hu16.npy beside it: the HU rounded to int16, as CT stores
them, which training memory-maps and evaluation reads as float32. (Entries written
before the .npy held float32 HU in the .npz; they are still read, and training writes
their .npy on first use.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from model_zoo.contract import InputContract, analysed_slices, model_input, resample_inplane

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("MYELOMA_CACHE", REPO_ROOT / "cache"))
# Bump when the phantom generator or the preparation changes, so stale caches are not reused.
PREPARATION_VERSION = "2"


@dataclass(frozen=True)
class SplitSpec:
    """A reproducible set of phantom studies."""

    name: str
    seed: int
    studies: int
    slices: int = 48
    external: bool = False

    @classmethod
    def from_dict(cls, name: str, d: dict) -> SplitSpec:
        return cls(name=name, **d)


@dataclass
class PreparedStudy:
    """One study on the contract grid: what training and evaluation consume."""

    key: str
    resampled_hu: np.ndarray  # float32 (K, H, W); int16 read-only memory map when loaded with integer_hu
    z_mm: np.ndarray  # float64 (K,), increasing
    slice_labels: np.ndarray  # int8 (K,): 1 lesion, 0 none, -1 ambiguous
    truth: dict
    lesion_mask: np.ndarray | None = None  # bool (K, H, W) on the contract grid (training supervision)

    @property
    def positive(self) -> bool:
        return bool(self.truth["positive"])


def study_inputs(study: PreparedStudy, contract: InputContract) -> np.ndarray:
    """Inputs for the analysed slices of a study (m, H, W, C), as the app computes them."""
    targets = study.z_mm[analysed_slices(study.z_mm, contract)]
    return model_input(study.resampled_hu, study.z_mm, targets, contract)


def prepare_study(seed: int, index: int, n_slices: int, external: bool, contract: InputContract) -> PreparedStudy:
    from model_zoo.phantoms.generator import render_study, sample_study_spec

    spec = sample_study_spec(seed, index, n_slices=n_slices, external=external)
    study = render_study(spec)
    spacing = float(study.pixel_spacing_mm)
    resampled = resample_inplane(study.hu, (spacing, spacing), contract)
    # The same resampling for the mask (air = -1000 outside the field of view counts as no lesion).
    mask = resample_inplane(study.lesion_mask.astype(np.float32), (spacing, spacing), contract) >= 0.5
    return PreparedStudy(
        key=f"s{seed}_i{index}",
        resampled_hu=resampled.astype(np.float32),
        z_mm=np.asarray(study.z_mm, dtype=np.float64),
        slice_labels=np.asarray(study.slice_labels, dtype=np.int8),
        truth=study.truth(),
        lesion_mask=mask,
    )


def _cache_dir(root: Path, contract: InputContract) -> Path:
    grid = {k: v for k, v in asdict(contract).items() if k in ("pixel_spacing_mm", "height", "width")}
    from model_zoo.phantoms import GENERATOR_VERSION

    versions = [PREPARATION_VERSION, GENERATOR_VERSION]
    tag = hashlib.sha256(json.dumps([grid, versions], sort_keys=True).encode()).hexdigest()[:12]
    return root / f"prepared_{tag}"


def _int16_path(path: Path) -> Path:
    return path.with_name(path.stem + ".hu16.npy")


def _write_int16(path: Path, hu: np.ndarray) -> None:
    """The HU of entry ``path`` rounded to int16 (0.5 HU at most, far below the 15-80 HU noise)."""
    partial = path.with_name(f"{path.stem}.hu16.{os.getpid()}.partial.npy")  # np.save keeps a .npy name
    np.save(partial, np.rint(hu).clip(-32768, 32767).astype(np.int16))
    os.replace(partial, _int16_path(path))


def _save(path: Path, study: PreparedStudy) -> None:
    _write_int16(path, study.resampled_hu)  # first: an entry whose .npz exists is complete
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, z_mm=study.z_mm, slice_labels=study.slice_labels, truth=np.array(json.dumps(study.truth)),
             lesion_mask=np.packbits(study.lesion_mask, axis=-1))
    os.replace(tmp, path)


def _load(path: Path, integer_hu: bool = False) -> PreparedStudy:
    with np.load(path) as f:
        if "resampled_hu" in f.files:  # an entry from before the int16 .npy
            hu = _int16_hu(path, f) if integer_hu else f["resampled_hu"]
        else:
            hu = np.load(_int16_path(path), mmap_mode="r")
            hu = hu if integer_hu else hu.astype(np.float32)
        packed = f["lesion_mask"]
        if packed.any():
            mask = np.unpackbits(packed, axis=-1, count=hu.shape[-1]).astype(bool)
        else:  # a lesion-free study (half of them): a read-only all-False view that takes no memory
            mask = np.broadcast_to(np.zeros(hu.shape[1:], dtype=bool), hu.shape)
        return PreparedStudy(key=path.stem, resampled_hu=hu, z_mm=f["z_mm"], slice_labels=f["slice_labels"],
                             truth=json.loads(str(f["truth"])), lesion_mask=mask)


def _int16_hu(path: Path, cached: np.lib.npyio.NpzFile) -> np.ndarray:
    """The int16 HU of an entry from before the .npy, memory-mapped read-only from one written beside it.

    Mapped, the split lives in the page cache, which the kernel can drop and read back
    under pressure; held in the process it could only grow (1200 training studies took
    22 GB of this 23 GB machine that way). The file is written on first use, and again
    when the cache entry is newer than it (the entry was prepared again).
    """
    side = _int16_path(path)
    if not side.exists() or side.stat().st_mtime_ns < path.stat().st_mtime_ns:
        _write_int16(path, cached["resampled_hu"])
    return np.load(side, mmap_mode="r")


def _prepare_to_cache(args: tuple) -> str:
    seed, index, n_slices, external, contract_dict, path = args
    path = Path(path)
    if not path.exists():
        _save(path, prepare_study(seed, index, n_slices, external, InputContract.from_dict(contract_dict)))
    return str(path)


def _prepared_paths(split: SplitSpec, contract: InputContract, cache_root: Path, workers: int | None,
                    progress: Callable[[int, int], None] | None) -> list[Path]:
    """The cache files of a split's studies, in index order; missing ones are prepared first."""
    folder = _cache_dir(Path(cache_root), contract)
    folder.mkdir(parents=True, exist_ok=True)
    ext = "x" if split.external else ""
    paths = [folder / f"s{split.seed}{ext}_k{split.slices}_i{i}.npz" for i in range(split.studies)]
    todo = [(split.seed, i, split.slices, split.external, contract.to_dict(), str(p))
            for i, p in enumerate(paths) if not p.exists()]
    if todo:
        log.info("preparing %d of %d %s studies into %s", len(todo), len(paths), split.name, folder)
        workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
        done = len(paths) - len(todo)
        if workers == 1:
            results = map(_prepare_to_cache, todo)
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_prepare_to_cache, todo, chunksize=1)
        for _ in results:
            done += 1
            if progress:
                progress(done, len(paths))
        if workers != 1:
            pool.shutdown()
    return paths


def load_split(
    split: SplitSpec,
    contract: InputContract,
    cache_root: Path = DEFAULT_CACHE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    integer_hu: bool = False,
    transform: Callable[[PreparedStudy], PreparedStudy] | None = None,
) -> list[PreparedStudy]:
    """Prepare (or read from the cache) every study of a split, in index order.

    ``integer_hu`` keeps the HU as the cache's int16, memory-mapped read-only: half the
    bytes of float32, and in the page cache rather than in the process, so training is not
    bounded by holding its split. ``transform`` is applied to each study as it is read, so
    only its results are held (e.g. training's edited lesion masks, 3.9 MB a positive study).
    """
    studies = []
    for path in _prepared_paths(split, contract, cache_root, workers, progress):
        study = _load(path, integer_hu)
        studies.append(transform(study) if transform else study)
    return studies


def load_scoring_split(split: SplitSpec, contract: InputContract, cache_root: Path = DEFAULT_CACHE) -> list[PreparedStudy]:
    """A split to score (calibration, compression reports): int16 memory maps without lesion masks.

    Scoring needs neither float32 copies nor masks (480 studies: 7.5 GB as float32, 1 GB of
    masks); the maps sit in the page cache, not in the process.
    """
    return load_split(split, contract, cache_root, integer_hu=True,
                      transform=lambda study: replace(study, lesion_mask=None))


def iter_split(split: SplitSpec, contract: InputContract, cache_root: Path = DEFAULT_CACHE,
               workers: int | None = None) -> Iterator[PreparedStudy]:
    """The studies of ``load_split``, read from the cache one at a time (all prepared first).

    For one pass over a split, e.g. scoring it: only one study is in memory at a time
    (600 studies held at once take 9.4 GB).
    """
    for path in _prepared_paths(split, contract, cache_root, workers, None):
        yield _load(path)


def split_specs(config: dict, names: Sequence[str] | None = None) -> dict[str, SplitSpec]:
    """SplitSpecs from a training config's ``data`` section."""
    data = config["data"]
    names = names or list(data)
    return {n: SplitSpec.from_dict(n, data[n]) for n in names}
