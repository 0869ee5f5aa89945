"""The analysis engine: CT series in, StudyResult out, and the ``analyze`` command.

Per series, three threads share the work so both CPU cores stay busy (numpy, file
reads and the LiteRT interpreter release the GIL):

1. reading + resampling: the int16 slices - decoded from their files right here when
   the series comes from ``analyze_paths`` - go onto the contract grid a chunk at a
   time (``contract.resample_inplane``);
2. stacking: the 2.5D, windowed model input of every slice whose neighbours are in
   (``contract.model_input``); resampled slices no later input needs are dropped;
3. inference, in the calling thread: the interpreter runs each batch and the slice
   probabilities and CAM maps are collected. Thin-slice series are analysed on the
   contract's ``analysed_slices`` only (about ``z_step_mm`` apart); the slices between
   get interpolated probabilities.

So reading overlaps preprocessing and inference; only the header pass (which series,
in which order) comes first. Bounded queues between the stages keep the working
memory proportional to the batch size, not the series length, and the model inputs
are bit-identical to ``contract.model_input`` on the whole volume.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from app.analysis import AnalysisError, build_study_result
from app.domain import CLI_WORK_DIR_PREFIX, AppError, Series, StudyResult
from app.ingest import IngestLimits, InputError, PendingSeries, plan_ingest
from app.runtime import LoadedModel, load_model
from model_zoo.contract import InputContract, analysed_slices, model_input, resample_inplane
from model_zoo.litert import LiteRTError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4  # slices per interpreter call; small batches stay in cache (measured: less CPU, less RSS)
PREFETCH_DEPTH = 2  # input batches the producer may run ahead of the interpreter
STAGES = ("read", "preprocess", "inference", "post")

T = TypeVar("T")
SliceProgress = Callable[[int, int], None]  # (slices done, slices total)
StageProgress = Callable[[str, int, int], None]  # (stage "read" | "analyze", done, total)


class AnalysisCancelled(AppError):
    """The caller asked to stop (UI cancel button)."""


class NoStudyAnalysed(AppError):
    """Nothing in the input could be analysed."""


@dataclass
class StageClock:
    """Busy seconds per stage, each written by one thread only.

    Stages run concurrently, so they may add up to more than the wall time.
    """

    read: float = 0.0
    resample: float = 0.0
    stack: float = 0.0
    inference: float = 0.0
    post: float = 0.0

    def timing(self) -> dict[str, float]:
        """The ``StudyResult.timing_s`` stages (without ``total``)."""
        return {"read": self.read, "preprocess": self.resample + self.stack, "inference": self.inference,
                "post": self.post}


# --- the pipeline -------------------------------------------------------------------


def resampled_chunks(chunks: Iterable[np.ndarray], pixel_spacing_mm: Sequence[float], contract: InputContract,
                     clock: StageClock | None = None) -> Iterator[np.ndarray]:
    """Each chunk of HU slices (k, rows, cols) on the contract grid (k, height, width) float32, as it arrives."""
    clock = clock or StageClock()
    source = iter(chunks)
    while True:
        started = time.perf_counter()
        chunk = next(source, None)
        clock.read += time.perf_counter() - started
        if chunk is None:
            return
        started = time.perf_counter()
        resampled = resample_inplane(chunk, pixel_spacing_mm, contract)
        clock.resample += time.perf_counter() - started
        yield resampled


def model_input_batches(
    resampled: Iterable[np.ndarray],
    z_mm: np.ndarray,
    contract: InputContract,
    batch_size: int = DEFAULT_BATCH_SIZE,
    clock: StageClock | None = None,
    reuse: int = 0,
    targets: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Model inputs (slice indices, (m, h, w, c) float32) from consecutive chunks of resampled slices.

    ``targets``: increasing indices of the slices to build inputs for (default: every
    slice; the engine passes ``contract.analysed_slices``). A target's input is built
    once the first slice beyond its highest z offset is in, so every batch sees exactly
    the neighbours the whole volume would give it, and resampled slices no later input
    needs are dropped. Batches are ``batch_size`` long except the last.

    With ``reuse`` = k > 0 the batches are written into k arrays in turn (no fresh
    memory per batch), so a batch is overwritten k batches later: for a consumer that
    is done with each batch before the producer can get k - 1 batches ahead of it.
    """
    clock = clock or StageClock()
    z = np.asarray(z_mm, dtype=np.float64)
    n = len(z)
    wanted = np.arange(n) if targets is None else np.asarray(targets, dtype=np.intp)
    reach_below = min(0.0, *contract.z_offsets_mm)
    reach_above = max(0.0, *contract.z_offsets_mm)
    planes: list[np.ndarray] = []  # resampled slices first..loaded-1 (views into the chunks, never copied)
    buffers = [np.empty((batch_size, contract.height, contract.width, contract.channels), np.float32)
               for _ in range(reuse)]
    first = loaded = done = produced = 0  # done: targets built so far
    for chunk in resampled:
        started = time.perf_counter()
        planes.extend(chunk)
        loaded += len(chunk)
        if loaded >= n:
            ready = len(wanted)
        else:  # targets whose highest neighbour lies strictly below the last slice in
            ready_slices = int(np.searchsorted(z, z[loaded - 1] - reach_above, side="left")) if loaded else 0
            ready = int(np.searchsorted(wanted, ready_slices, side="left"))
        while ready - done >= batch_size or (loaded >= n and done < len(wanted)):
            stop = min(done + batch_size, len(wanted))
            indices = wanted[done:stop]
            out = buffers[produced % reuse][:stop - done] if reuse else None
            batch = model_input(planes, z[first:loaded], z[indices], contract, out=out)
            produced += 1
            clock.stack += time.perf_counter() - started
            yield indices, batch
            started = time.perf_counter()
            done = stop
            if done < len(wanted):  # drop slices below the lower neighbour of the next target
                keep = max(0, int(np.searchsorted(z, z[wanted[done]] + reach_below, side="right")) - 1)
                if keep > first:
                    del planes[:keep - first]
                    first = keep
        clock.stack += time.perf_counter() - started
    if loaded < n:
        raise ValueError(f"the slice source ended after {loaded} of {n} slices")


def _prefetched(items: Iterable[T], depth: int = PREFETCH_DEPTH) -> Iterator[T]:
    """Iterate ``items`` in a producer thread, at most ``depth`` items ahead of the consumer.

    Exceptions of the producer are raised in the consumer; when the consumer stops
    early (error, cancel, interrupt) the producer stops after its current item.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # an abandoned upstream generator stops its own producer too
                close()
        put((False, None))

    thread = threading.Thread(target=produce, name="analysis-producer", daemon=True)
    thread.start()
    try:
        while True:
            is_item, value = handoff.get()
            if not is_item:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


def _check_series(series: Series) -> None:
    n = series.n_slices
    hu = series.hu
    if n == 0 or hu is None or hu.ndim != 3 or len(hu) != n or len(series.z_mm) != n:
        raise AnalysisError(f"series {series.series_instance_uid} is inconsistent: {n} slice UIDs, "
                            f"pixel data {getattr(hu, 'shape', None)}, {len(series.z_mm)} positions")
    if n > 1 and np.any(np.diff(np.asarray(series.z_mm, dtype=np.float64)) <= 0):
        raise AnalysisError(f"series {series.series_instance_uid} is not sorted by slice position")
    if min(series.pixel_spacing_mm) <= 0:
        raise AnalysisError(f"series {series.series_instance_uid} has an invalid pixel spacing")


# --- library API --------------------------------------------------------------------


class Analyzer:
    """A loaded, verified model and the pipeline that runs it. One per process or UI session.

    ``analyze_series`` may be called from several threads; interpreter calls are serialised.
    """

    def __init__(self, model: str | None = None, variant: str | None = None, threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._loaded: LoadedModel = load_model(model, variant, threads)
        self.card = self._loaded.card
        self.model_ref = self._loaded.ref
        self.threads = self._loaded.threads
        self.batch_size = batch_size

    def analyze_series(self, series: Series, progress: SliceProgress | None = None,
                       cancel: threading.Event | None = None) -> StudyResult:
        """Run the model on the analysed slices of ``series`` and aggregate the study result.

        Raises AnalysisError (unusable series or model output) and AnalysisCancelled.
        """
        _check_series(series)
        size = self.batch_size
        chunks = (series.hu[i:i + size] for i in range(0, series.n_slices, size))
        return self._analyze(series, chunks, progress, cancel)

    def analyze_pending(self, pending: PendingSeries, progress: SliceProgress | None = None,
                        cancel: threading.Event | None = None) -> tuple[Series, StudyResult] | None:
        """Decode and analyse one study's chosen series in one pipeline, so reading overlaps the work.

        Returns the decoded series and its result, or None when the study has no
        analysable series (the reason is in the plan's errors). When some files turn
        out to be unreadable, the series without them is analysed again from memory.
        Raises like ``analyze_series``.
        """
        series = pending.open()
        if series is None:
            pending.load()  # records why
            return None
        _check_series(series)
        result = self._analyze(series, pending.decode_chunks(self.batch_size), progress, cancel)
        decoded = pending.load()
        if decoded is None:
            return None
        if decoded is not series:
            result = self.analyze_series(decoded, progress, cancel)
        return decoded, result

    def _analyze(self, series: Series, chunks: Iterable[np.ndarray], progress: SliceProgress | None,
                 cancel: threading.Event | None) -> StudyResult:
        """The pipeline over ``chunks`` of ``series.hu`` (in slice order), then the study result."""
        started = time.perf_counter()
        n, size = series.n_slices, self.batch_size
        clock = StageClock()
        contract = self.card.contract
        # Three threads: reading + resampling, 2.5D stacking + windowing, and (here) the interpreter.
        resampled = _prefetched(resampled_chunks(chunks, series.pixel_spacing_mm, contract, clock))
        analysed = analysed_slices(series.z_mm, contract)
        # The interpreter copies a batch in before it takes the next one, and the producer can
        # be at most PREFETCH_DEPTH + 1 batches ahead of it: so PREFETCH_DEPTH + 2 buffers suffice.
        batches = _prefetched(model_input_batches(resampled, series.z_mm, contract, size, clock,
                                                  reuse=PREFETCH_DEPTH + 2, targets=analysed))
        probabilities = np.empty(len(analysed), np.float32)
        cams = None
        done = 0
        try:
            for indices, batch in batches:
                if cancel is not None and cancel.is_set():
                    raise AnalysisCancelled("analysis cancelled")
                t = time.perf_counter()
                try:
                    p, cam = self._loaded.tflite.predict(batch)
                except (LiteRTError, RuntimeError, ValueError) as exc:
                    raise AnalysisError(f"the model failed on slices {indices[0]}-{indices[-1]}: {exc}") from exc
                clock.inference += time.perf_counter() - t
                if cams is None:
                    cams = np.empty((len(analysed), *cam.shape[1:]), np.float32)
                probabilities[done:done + len(indices)], cams[done:done + len(indices)] = p, cam
                done += len(indices)
                if progress is not None:
                    progress(int(indices[-1]) + 1, n)
        finally:  # stop and join the producer threads now, also on error or cancel
            batches.close()
            resampled.close()
        t = time.perf_counter()
        result = build_study_result(series, analysed, probabilities, cams, self.card, self.model_ref)
        clock.post = time.perf_counter() - t
        result.timing_s = {**clock.timing(), "total": time.perf_counter() - started}
        log.info("series analysed: %d slices, p=%.3f, %d findings, %.2f s", n, result.probability,
                 len(result.findings), result.timing_s["total"])
        return result


def _series_location(series: Series) -> str:
    """Where a series came from, for error entries: the common folder of its files."""
    if not series.files:
        return series.series_instance_uid
    folders = {str(Path(f).parent) for f in series.files}
    return folders.pop() if len(folders) == 1 else str(Path(series.files[0]).parent)


def iter_study_analyses(
    paths: Sequence[str | Path],
    analyzer: Analyzer,
    workdir: Path,
    errors: list[InputError],
    progress: StageProgress | None = None,
    limits: IngestLimits | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[tuple[Series, StudyResult]]:
    """Ingest DICOM folders/zips/files and analyse the chosen series of every study, one study at a time.

    Yields each study's (series, result) as soon as it is analysed; the ingest plan lets go
    of a study's pixels once it is yielded, so a consumer that keeps only the results holds
    one study's pixels at a time. Input errors (files that could not be used, series the
    model could not analyse) are appended to ``errors`` by the end. ``workdir`` is a temp
    dir the caller owns. ``progress(stage, done, total)`` reports file headers read, then
    slices analysed over all studies. Each study's pixels are decoded while it is analysed
    (``Analyzer.analyze_pending``). The ``read`` time of each result is its share (by slice
    count) of the header pass plus the time spent decoding its pixels.
    """
    read_progress = (lambda done, total: progress("read", done, total)) if progress else None
    started = time.perf_counter()
    plan = plan_ingest(paths, workdir, limits or IngestLimits(), progress=read_progress)
    header_s = time.perf_counter() - started
    failures: list[InputError] = []
    total = sum(pending.n_slices for pending in plan.studies)
    offset = 0
    for pending in plan.studies:
        def slice_progress(done: int, _n: int, base: int = offset) -> None:
            if progress is not None:
                progress("analyze", base + done, total)

        try:
            outcome = _analyze_study(analyzer, pending, slice_progress, cancel)
        except AnalysisCancelled:
            raise
        except AnalysisError as exc:
            failures.append(InputError(path=_series_location(pending.series), error=str(exc)))
            outcome = None
        finally:
            pending.release()
        offset += pending.n_slices
        if outcome is not None:
            series, result = outcome
            share = header_s * series.n_slices / max(total, 1)
            result.timing_s["read"] += share
            result.timing_s["total"] += share
            yield outcome
            del outcome, series, result  # or this study's pixels would live on while the next one is analysed
    for skipped in plan.result.skipped:
        log.info("not analysed: %s: %s", skipped.path, skipped.error)
    errors.extend([*plan.result.errors, *failures])


def analyze_paths(
    paths: Sequence[str | Path],
    analyzer: Analyzer,
    workdir: Path,
    progress: StageProgress | None = None,
    limits: IngestLimits | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[tuple[Series, StudyResult]], list[InputError]]:
    """All of ``iter_study_analyses`` at once: the (series, result) pairs and the input errors."""
    errors: list[InputError] = []
    pairs = list(iter_study_analyses(paths, analyzer, workdir, errors, progress, limits, cancel))
    return pairs, errors


def _analyze_study(analyzer: Analyzer, pending: PendingSeries, progress: SliceProgress,
                   cancel: threading.Event | None) -> tuple[Series, StudyResult] | None:
    """One study: streamed when the analyzer offers ``analyze_pending``, else decoded first
    (for a wrapper that offers ``analyze_series`` only)."""
    if hasattr(analyzer, "analyze_pending"):
        return analyzer.analyze_pending(pending, progress=progress, cancel=cancel)
    started = time.perf_counter()
    series = pending.load()
    if series is None:
        return None
    decode_s = time.perf_counter() - started
    result = analyzer.analyze_series(series, progress=progress, cancel=cancel)
    result.timing_s["read"] += decode_s
    result.timing_s["total"] += decode_s
    return series, result


# --- the `analyze` command ------------------------------------------------------------


def _terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal on stderr. A terminal that reports 0 x 0 (serial consoles,
    a bare pty) would make tqdm hide its bar, so it counts as 80 x 24."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


class _ProgressBars:
    """tqdm bars on stderr, one per stage, only when stderr is a terminal."""

    LABELS = {"read": "reading DICOM", "analyze": "analysing slices"}

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            for other in self._bars.values():
                other.close()
            unit = "file" if stage == "read" else "slice"
            columns, lines = _terminal_size()
            bar = self._bars[stage] = tqdm(total=total, desc=self.LABELS.get(stage, stage), unit=unit,
                                           file=sys.stderr, leave=False, ncols=columns, nrows=lines)
        bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def results_json(results: Iterable[StudyResult], errors: list[InputError]) -> dict:
    """The ``analyze`` output document: {"studies": [...], "errors": [{"path", "error"}]}."""
    return {"studies": [result.to_json() for result in results],
            "errors": [{"path": str(e.path), "error": e.error} for e in errors]}


def checked_destination(destination: str) -> Path | None:
    """The file ``--json`` names (None for '-', stdout), checked before any work is done."""
    if destination == "-":
        return None
    path = Path(destination)
    if not path.name or path.name in (".", "..") or path.is_dir():
        raise AppError(f"--json needs a file name, not the folder {destination!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AppError(f"cannot create the folder for {path}: {exc.strerror or exc}") from exc
    return path


def write_json(document: dict, destination: str) -> None:
    """Write the document to ``destination`` ('-': stdout) whole or not at all (no partial file stays)."""
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if destination == "-":
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader went away (e.g. "| head"): nothing left to tell it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise AppError("the result could not be written: the reader of standard output closed it") from None
        return
    path = checked_destination(destination)
    partial = None
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(partial, path)
    except OSError as exc:
        raise AppError(f"cannot write the result to {path}: {exc.strerror or exc}") from exc
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)


def key_image_folder(heatmap_dir: Path, series_instance_uid: str) -> Path:
    """``heatmap_dir/<SeriesInstanceUID>``, whatever characters a hostile header puts in the UID."""
    name = re.sub(r"[^0-9A-Za-z._-]", "_", series_instance_uid).lstrip(".") or "series"
    return heatmap_dir / name


def write_key_images(series: Series, result: StudyResult, out_dir: Path) -> list[Path]:
    """PNG key images (bone window + heatmap, the same pictures as the DICOM key images), one per heatmap."""
    from PIL import Image

    from app.results_dicom import overlay_rgb  # highdicom/matplotlib: only loaded when images are asked for

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in sorted(result.heatmaps):
        path = out_dir / f"slice_{index:04d}.png"
        Image.fromarray(overlay_rgb(series.hu[index], result.heatmaps[index])).save(path)
        paths.append(path)
    return paths


def _no_study_reason(errors: list[InputError], destination: str) -> str:
    if not errors:
        return "no analysable CT series found in the input"
    where = "" if destination == "-" else f" in {destination}"
    more = f" (and {len(errors) - 1} more problems; see 'errors'{where})" if len(errors) > 1 else ""
    return f"no study analysed: {errors[0].path}: {errors[0].error}{more}"


def analyze_cli(args) -> int:
    """``python -m app.cli analyze``: exit 0 when at least one study was analysed.

    Raises AppError (exit 2, one line on stderr) for a bad destination or model, or when
    nothing could be analysed. Key images are written study by study, so only one study's
    pixels are held at a time; one that cannot be written becomes an ``errors`` entry.
    """
    destination = checked_destination(args.json)
    heatmap_dir = Path(args.heatmaps) if getattr(args, "heatmaps", None) else None
    if heatmap_dir is not None:
        try:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AppError(f"cannot create the key image folder {heatmap_dir}: {exc.strerror or exc}") from exc
    try:
        analyzer = Analyzer(args.model, getattr(args, "variant", None), args.threads)
    except AppError as exc:
        if destination is not None:  # OUT must not keep an earlier run's result after this run failed
            write_json(results_json([], [InputError(str(args.model or "default model"), str(exc))]), args.json)
        raise
    bars = _ProgressBars()
    results: list[StudyResult] = []
    errors: list[InputError] = []
    try:
        with tempfile.TemporaryDirectory(prefix=CLI_WORK_DIR_PREFIX) as workdir:
            for series, result in iter_study_analyses(args.inputs, analyzer, Path(workdir), errors, progress=bars):
                results.append(result)
                if heatmap_dir is None:
                    continue
                folder = key_image_folder(heatmap_dir, result.series_instance_uid)
                try:
                    write_key_images(series, result, folder)
                except OSError as exc:
                    errors.append(InputError(str(folder), f"key images could not be written: {exc.strerror or exc}"))
    finally:
        bars.close()
    write_json(results_json(results, errors), args.json)
    if not results:
        raise NoStudyAnalysed(_no_study_reason(errors, args.json))
    for result in results:
        log.info("%s: probability %.3f (threshold %.2f)", result.triage_label, result.probability, result.threshold)
    return 0
