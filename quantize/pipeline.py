"""One compression run: float Keras model -> pruned / QAT / PQAT models -> TFLite variants -> measured, chosen, recorded.

Stages, each seeded from the recipe so a run is reproducible:

1. prune (tfmot PolynomialDecay to the target sparsity while fine-tuning; strip);
2. QAT from the float model, PQAT from the pruned one (sparsity kept); every fine-tuning
   distils the float model's cam (``quantize.finetune``);
3. convert every variant with the app's signature (``quantize.export``);
4. measure every file with LiteRT on held-out studies (``quantize.measure``);
5. choose the app's default variant, check acceptance, write the card, report.md and the plot.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

from model_zoo.architectures import custom_objects  # noqa: E402
from model_zoo.card import ModelCard, ModelError, Variant, load_card  # noqa: E402
from model_zoo.contract import model_input  # noqa: E402
from quantize import export, measure, report  # noqa: E402
from quantize.finetune import fine_tune  # noqa: E402
from quantize.prune import layer_sparsity, prunable_sparsity, prune  # noqa: E402
from quantize.qat import calibrate_activation_ranges, quantize_aware  # noqa: E402
from quantize.recipe import REFERENCE_VARIANT, VARIANTS, Recipe  # noqa: E402
from quantize.sources import DataSources  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    folder: Path
    card: ModelCard
    metrics: dict[str, dict]  # variant -> measured numbers (also in card.variants[...].metrics)
    default: str
    default_reason: str
    acceptance: list[report.Check] | None
    report_path: Path
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.acceptance is None or all(c.passed for c in self.acceptance)


def variant_file(name: str) -> str:
    return f"model_{name}.tflite"


def load_float_model(card: ModelCard) -> tf_keras.Model:
    """The card's float Keras model, hash-checked; a ModelError the user can act on otherwise."""
    if not card.keras_file:
        raise ModelError(f"model {card.name!r} has no Keras model in its card; compression starts from the float Keras model")
    path = card.verify(card.keras_file)
    try:
        return tf_keras.models.load_model(str(path), custom_objects=custom_objects(), compile=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot load the Keras model {path.name}: it is corrupt or not a Keras model ({exc})") from exc


def _trained_models(float_model: tf_keras.Model, recipe: Recipe, sources: DataSources) -> tuple[dict, dict, dict]:
    """Source models by name (float, pruned, qat, pqat), their per-layer sparsity and fine-tuning losses."""
    models = {"float": float_model}
    losses: dict[str, list[float]] = {}
    if recipe.needs("pruned") or recipe.needs("pqat"):
        tf_keras.utils.set_random_seed(recipe.seed)
        pruned = prune(float_model, sources.finetune(recipe.batch_size, recipe.seed), recipe.pruning)
        models["pruned"], losses["pruning"] = pruned.model, pruned.losses
    for name, source, config, offset in (("qat", "float", recipe.qat, 1), ("pqat", "pruned", recipe.pqat, 2)):
        if not recipe.needs(name):
            continue
        tf_keras.utils.set_random_seed(recipe.seed + offset)
        models[name] = quantize_aware(models[source], preserve_sparsity=name == "pqat")
        data = sources.finetune(recipe.batch_size, recipe.seed + offset)
        calibrate_activation_ranges(models[name], data, config.calibration_batches)
        losses[name] = fine_tune(models[name], float_model, data, config.steps, config.learning_rate, name)
    layers = {name: layer_sparsity(m) for name, m in models.items()}
    return models, layers, losses


def _measure(files: dict[str, Path], card: ModelCard, recipe: Recipe, sources: DataSources,
             sparsity: dict[str, float]) -> dict[str, dict]:
    studies = sources.evaluation()
    labels = [int(s.positive) for s in studies]
    log.info("evaluating %d variants on %d %s studies (%d positive) with LiteRT", len(files), len(studies),
             recipe.evaluation.split, sum(labels))
    preds = measure.predict_studies(files, studies, card.contract, card.aggregation)
    first = studies[0]
    middle = len(first.z_mm) // 2
    targets = first.z_mm[middle:middle + recipe.evaluation.latency_batch]
    sample = model_input(first.resampled_hu, first.z_mm, np.resize(targets, recipe.evaluation.latency_batch), card.contract)
    del studies
    latency = {threads: measure.latencies_ms_per_slice(files, sample, threads, recipe.evaluation.latency_warmup,
                                                       recipe.evaluation.latency_runs)
               for threads in recipe.evaluation.threads}
    metrics = {}
    for name, path in files.items():
        m = {"kind": VARIANTS[name].kind or name, "io_dtype": VARIANTS[name].io_dtype, "sparsity": round(sparsity[name], 4),
             "evaluation_split": recipe.evaluation.split, "n_studies": len(labels), "n_positive": int(sum(labels)),
             **measure.accuracy(labels, preds[name].study_probs, card.threshold, seed=recipe.seed),
             **measure.agreement(preds[name], preds[REFERENCE_VARIANT], card.threshold),
             **measure.file_sizes(path)}
        stored = measure.stored_conv_sparsity(path)
        m["stored_conv_sparsity"] = None if stored is None else round(stored, 4)
        for threads in recipe.evaluation.threads:
            m[f"latency_ms_{threads}t"] = round(latency[threads][name], 3)
        m.update(measure.peak_memory_mb(path, max(recipe.evaluation.threads), recipe.evaluation.memory_batch))
        metrics[name] = m
        log.info("%s: AUC %s, max|dp| %.4f, %d bytes (%d gzip), %s", name, m["auc"], m["max_abs_dp"], m["bytes"],
                 m["gzip_bytes"], ", ".join(f"{m[f'latency_ms_{t}t']:.2f} ms/slice@{t}T" for t in recipe.evaluation.threads))
    return metrics


def _output_card(card: ModelCard, out_dir: Path | None) -> ModelCard:
    """The card to record variants in: the model's own, or a copy of its own in ``out_dir``."""
    if out_dir is None or Path(out_dir).resolve() == Path(card.folder).resolve():
        return card
    return replace(card, keras_file="", variants={}, files={}, folder=Path(out_dir))


def compress(card: ModelCard, recipe: Recipe, sources: DataSources, out_dir: Path | None = None) -> RunResult:
    """Run a recipe on a model; write the variants, card, report.md and plot; return what was measured."""
    float_model = load_float_model(card)
    target = _output_card(card, out_dir)
    folder = Path(target.folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Everything is made in a staging folder and moved in just before the card is written, so a run
    # that fails part-way leaves the model folder as it was (its files still match its card). Made
    # first: a folder the run cannot write to shows now, not after the fine-tuning.
    staging = Path(tempfile.mkdtemp(prefix=".quantize-", dir=folder))
    try:
        models, layers, losses = _trained_models(float_model, recipe, sources)
        sparsity_of = {source: prunable_sparsity(rows) for source, rows in layers.items()}
        staged: dict[str, Path] = {}
        for name in recipe.variants:
            spec = VARIANTS[name]
            flatbuffer = export.convert(models[spec.source], card.contract.input_shape, spec.converter, spec.io_dtype,
                                        sources.representative, sparse_storage=spec.sparse_storage)
            staged[name] = export.write_tflite(flatbuffer, staging / variant_file(name), card.contract)
        sparsity = {name: sparsity_of[VARIANTS[name].source] for name in staged}
        metrics = _measure(staged, card, recipe, sources, sparsity)

        default, reason = report.choose_default(metrics, recipe.selection)
        acceptance = report.check_acceptance(metrics, recipe.acceptance) if recipe.acceptance else None
        variants = {
            name: Variant(file=variant_file(name), kind=metrics[name]["kind"], recipe=recipe.name,
                          sparsity=metrics[name]["sparsity"], io_dtype=metrics[name]["io_dtype"], metrics=metrics[name],
                          notes=f"{VARIANTS[name].describe()}; seed {recipe.seed}")
            for name in staged
        }
        plot_path = report.plot(metrics, staging / report.PLOT_FILE, recipe.selection.latency_threads)
        report.write_report(
            staging / report.REPORT_FILE, header=_header(card, recipe, metrics), metrics=metrics,
            threads=recipe.evaluation.threads, default=(default, reason), acceptance=acceptance,
            acceptance_variant=recipe.acceptance.variant if recipe.acceptance else None,
            layers={k: [r.to_json() for r in v] for k, v in layers.items() if k in ("pruned", "pqat")}, losses=losses,
            plot_file=plot_path.name)
        target = _current_card(target, card)  # refuses before anything is moved in
        for made in staging.iterdir():
            os.replace(made, folder / made.name)
        target = _record(target, variants, default, reason, _provenance(recipe, card))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {name: folder / variant_file(name) for name in staged}
    log.info("default variant: %s", reason)
    return RunResult(folder, target, metrics, default, reason, acceptance, folder / report.REPORT_FILE, files)


def _current_card(target: ModelCard, source: ModelCard) -> ModelCard:
    """The card to record this run in, as it is on disk now; refuses if the Keras model changed.

    A run takes a while; the model's own card.json may have gained evaluation metrics
    in between, so it is re-read. If the Keras model itself changed, the variants no
    longer belong to it.
    """
    if target is not source:
        return target
    current = load_card(source.folder)
    keras = source.keras_file
    source.verify(keras)  # the file is still the one this run started from (raises otherwise)
    if current.files.get(keras) != source.files.get(keras):
        raise ModelError(f"{keras} of {source.name!r} changed during the compression run; run it again on the new model")
    return current


def _record(target: ModelCard, variants: dict[str, Variant], default: str, reason: str, provenance: dict) -> ModelCard:
    """Write this run's variants into ``target`` (see ``_current_card``): only the compression fields change."""
    target.variants = variants
    target.default_variant, target.default_variant_reason = default, reason
    target.metrics = {**target.metrics, "compression": provenance}
    target.files = {}
    target.record_hashes()
    target.save()
    return target


def _provenance(recipe: Recipe, card: ModelCard) -> dict:
    return {
        "recipe": recipe.name, "recipe_sha256": recipe.sha256, "seed": recipe.seed,
        "source_keras_sha256": card.files.get(card.keras_file, ""), "evaluation_split": recipe.evaluation.split,
        "report": report.REPORT_FILE, "tensorflow": tf.__version__, "tfmot": tfmot.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _cpu_name() -> str:
    """CPU model and the SIMD features int8 speed depends on (VNNI, AMX), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(simd) or 'no AVX2'})"


def _header(card: ModelCard, recipe: Recipe, metrics: dict) -> dict:
    ref = metrics[REFERENCE_VARIANT]
    return {
        "model": card.name, "version": card.version,
        "architecture": card.architecture,
        "recipe": f"{recipe.name} (sha256 {recipe.sha256[:12] or 'n/a'}), seed {recipe.seed}",
        "evaluation": f"{ref['n_studies']} studies ({ref['n_positive']} positive) of split '{recipe.evaluation.split}', "
                      f"{ref['slices']} slices; threshold {card.threshold:.4f} from the card",
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end of "
                   f"the measurements (other work on the machine inflates latencies); TensorFlow {tf.__version__}, "
                   f"tfmot {tfmot.__version__}",
        "date": datetime.date.today().isoformat(),
    }
