"""Compression recipes: JSON files in quantize/recipes/ that fix every knob of a run.

A recipe names the variants to build, the pruning schedule, the QAT / PQAT
fine-tuning, the data splits, the evaluation and the rules that pick the app's
default variant. Same recipe + same seed + same model = same files.
Unknown keys are errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from model_zoo.card import sha256_file

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"



@dataclass(frozen=True)
class VariantSpec:
    """How a variant is made: from which model (the float Keras model, its pruned copy, or
    the QAT / PQAT copy fine-tuned by this run), with which converter (quantize.export), and
    whether zero weights are stored in TFLite's sparse format (``EXPERIMENTAL_SPARSITY``:
    smaller file, densified once at load, same kernels and speed)."""

    source: str
    converter: str
    io_dtype: str = "float32"
    sparse_storage: bool = False
    kind: str = ""  # the card's Variant.kind; defaults to the variant name

    def describe(self) -> str:
        storage = ", sparse storage" if self.sparse_storage else ""
        return f"source model: {self.source}; converter: {self.converter}, {self.io_dtype} I/O{storage}"


VARIANTS: dict[str, VariantSpec] = {
    "float32": VariantSpec("float", "float32"),
    "float16": VariantSpec("float", "float16"),
    "dynamic_range": VariantSpec("float", "dynamic_range"),
    "int8": VariantSpec("float", "int8"),
    "int8_io": VariantSpec("float", "int8", io_dtype="int8", kind="int8"),
    "pruned_float32": VariantSpec("pruned", "float32", kind="float32"),
    "qat_int8": VariantSpec("qat", "quantization_aware"),
    "pqat_int8": VariantSpec("pqat", "quantization_aware"),
    "pqat_int8_sparse": VariantSpec("pqat", "quantization_aware", sparse_storage=True, kind="pqat_int8"),
}
REFERENCE_VARIANT = "float32"  # every comparison is against the float TFLite file


class RecipeError(Exception):
    """A recipe cannot be found or is invalid. The message is for the user."""


@dataclass(frozen=True)
class PruningConfig:
    """Magnitude pruning: PolynomialDecay from ``initial_sparsity`` at ``begin_step`` to a layer's target at ``end_step``.

    The target is ``target_sparsity`` for every Conv2D / Dense kernel, unless ``size_tiers``
    ([[min_weights, sparsity], ...]) is given: then a kernel takes the sparsity of the largest
    ``min_weights`` it reaches, and smaller kernels stay dense. Small kernels (the stem, the
    first blocks, the one-channel cam) carry every feature after them; a uniform 85% left the
    stem 130 of its 864 weights and the model at chance.
    """

    target_sparsity: float = 0.6
    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 300
    frequency: int = 25
    steps: int = 400  # fine-tuning steps in total (the last ones at the target sparsity)
    learning_rate: float = 1e-4
    size_tiers: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:  # JSON lists -> tuples, largest tier first
        tiers = tuple(sorted(((int(n), float(t)) for n, t in self.size_tiers), reverse=True))
        object.__setattr__(self, "size_tiers", tiers)

    def layer_target(self, weights: int) -> float | None:
        """The sparsity a prunable kernel of ``weights`` weights is pruned to; None: left dense."""
        if not self.size_tiers:
            return self.target_sparsity
        return next((sparsity for min_weights, sparsity in self.size_tiers if weights >= min_weights), None)

    def validate(self) -> None:
        targets = [t for _, t in self.size_tiers] or [self.target_sparsity]
        if not all(0.0 <= self.initial_sparsity <= t < 1.0 for t in targets):
            raise RecipeError("pruning needs 0 <= initial_sparsity <= target_sparsity (and every size tier's) < 1")
        if any(n < 1 for n, _ in self.size_tiers):
            raise RecipeError("pruning size_tiers need min_weights >= 1")
        if not 0 <= self.begin_step < self.end_step <= self.steps:
            raise RecipeError("pruning needs 0 <= begin_step < end_step <= steps")
        if self.frequency < 1 or self.learning_rate <= 0:
            raise RecipeError("pruning frequency and learning_rate must be positive")


@dataclass(frozen=True)
class FineTuneConfig:
    """Quantization-aware fine-tuning (QAT or PQAT)."""

    steps: int = 200
    learning_rate: float = 2e-5
    calibration_batches: int = 50  # forward passes that set the activation ranges before fine-tuning

    def validate(self) -> None:
        if self.steps < 1 or self.learning_rate <= 0 or self.calibration_batches < 0:
            raise RecipeError("fine-tuning steps and learning_rate must be positive, calibration_batches >= 0")


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out evaluation through LiteRT, latency and memory."""

    split: str = "test"
    threads: tuple[int, ...] = (1, 2)
    latency_batch: int = 1  # slices per interpreter call when timing
    latency_warmup: int = 3
    latency_runs: int = 30
    memory_batch: int = 16  # an upper bound: the app runs batches of 4 (app.engine.DEFAULT_BATCH_SIZE)

    def validate(self) -> None:
        if not self.threads or min(self.threads) < 1:
            raise RecipeError("evaluation.threads must list positive thread counts")
        if self.latency_batch < 1 or self.latency_runs < 1 or self.latency_warmup < 0 or self.memory_batch < 1:
            raise RecipeError("evaluation batch sizes and run counts must be positive")


@dataclass(frozen=True)
class SelectionConfig:
    """Which variants may become the app's default: no worse than float32 within these limits."""

    max_auc_drop: float = 0.01
    max_sensitivity_drop: float = 0.0
    max_study_flips: int = 0
    latency_threads: int = 2  # rank eligible variants by latency at this thread count
    latency_tolerance: float = 0.10  # latencies within 10% tie; the smaller gzip size wins


@dataclass(frozen=True)
class AcceptanceConfig:
    """The issue's acceptance criteria for one variant, checked and reported by every run.

    ``max_auc_drop`` is applied both ways here: the variant's AUC must lie within it of float32's.
    """

    variant: str = "pqat_int8"
    max_auc_drop: float = 0.01
    max_size_ratio: float = 0.30
    max_gzip_ratio: float = 0.20
    min_sparsity: float = 0.50


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    seed: int = 0
    batch_size: int = 16
    finetune_split: str = "train"
    representative_split: str = "train"
    representative_samples: int = 200
    variants: tuple[str, ...] = tuple(VARIANTS)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    qat: FineTuneConfig = field(default_factory=FineTuneConfig)
    pqat: FineTuneConfig = field(default_factory=FineTuneConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    acceptance: AcceptanceConfig | None = None
    path: str = ""
    sha256: str = ""

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise RecipeError(f"recipe {self.name!r}: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        if REFERENCE_VARIANT not in self.variants:
            raise RecipeError(f"recipe {self.name!r} must build {REFERENCE_VARIANT!r}: every variant is compared with it")
        if self.batch_size < 1 or self.representative_samples < 1:
            raise RecipeError(f"recipe {self.name!r}: batch_size and representative_samples must be positive")
        if self.acceptance and self.acceptance.variant not in self.variants:
            raise RecipeError(f"recipe {self.name!r}: acceptance variant {self.acceptance.variant!r} is not built")
        self.pruning.validate()
        self.qat.validate()
        self.pqat.validate()
        self.evaluation.validate()
        if self.selection.latency_threads not in self.evaluation.threads:
            # checked now: the report needs it after hours of fine-tuning and conversion
            raise RecipeError(f"recipe {self.name!r}: selection.latency_threads {self.selection.latency_threads} is "
                              f"not one of evaluation.threads {list(self.evaluation.threads)}")

    def needs(self, source: str) -> bool:
        """Does any requested variant come from this source model (float, pruned, qat, pqat)?"""
        return any(VARIANTS[v].source == source for v in self.variants)


_SECTIONS = {
    "pruning": PruningConfig,
    "qat": FineTuneConfig,
    "pqat": FineTuneConfig,
    "evaluation": EvaluationConfig,
    "selection": SelectionConfig,
    "acceptance": AcceptanceConfig,
}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)} - {"path", "sha256"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(known))}")
    for f in dataclasses.fields(cls):  # a "0.01" for 0.01 would only fail after hours of fine-tuning
        if f.name in data and not _same_kind(data[f.name], f.default):
            kind = {bool: "true or false", float: "a number", int: "an integer", str: "a string"}[type(f.default)]
            raise RecipeError(f"{where}: {f.name} must be {kind}, got {data[f.name]!r}")
    return cls(**data)


def _same_kind(value: object, default: object) -> bool:
    """Is ``value`` fit for a field whose default is ``default``? (Only scalar defaults are checked; an int may be a float.)"""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def recipe_from_dict(data: dict, path: str = "", sha256: str = "") -> Recipe:
    if "name" not in data:
        raise RecipeError(f"recipe {path or '<dict>'} has no 'name'")
    data = dict(data)
    where = f"recipe {data['name']!r}"
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and "threads" in evaluation:
        if not isinstance(evaluation["threads"], list):
            raise RecipeError(f"{where}: evaluation.threads must be a list of thread counts")
        data["evaluation"] = {**evaluation, "threads": tuple(evaluation["threads"])}
    for key, cls in _SECTIONS.items():
        if key in data and data[key] is None and key != "acceptance":  # only acceptance is optional
            raise RecipeError(f"{where} section {key!r} must be a JSON object, not null")
        if data.get(key) is not None:
            data[key] = _build(cls, data[key], f"{where} section {key!r}")
    if "variants" in data:
        if not isinstance(data["variants"], list):
            raise RecipeError(f"{where}: variants must be a list of variant names")
        data["variants"] = tuple(data["variants"])
    try:
        recipe = dataclasses.replace(_build(Recipe, data, where), path=path, sha256=sha256)
    except TypeError as exc:
        raise RecipeError(f"{where} is malformed: {exc}") from exc
    recipe.validate()
    return recipe


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (quantize/recipes/NAME.json) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
        raise RecipeError(f"no recipe {str(name_or_path)!r}; shipped recipes: {', '.join(known) or 'none'}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid JSON: {exc}") from exc
    return recipe_from_dict(data, path=str(path), sha256=sha256_file(path))
