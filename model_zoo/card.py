"""Model cards: what a shipped model is, how to feed it, how good it is, and file hashes.

A model folder holds ``card.json`` plus the files it lists. This module is the one
place that knows that layout and the registry of shipped models. numpy-free and
TensorFlow-free: the clinic app imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model_zoo.contract import InputContract

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"
REGISTRY_FILE = MODELS_DIR / "registry.json"
CARD_FILE = "card.json"


class ModelError(Exception):
    """A model cannot be found, read or trusted. The message is for the user."""


@dataclass
class Variant:
    """One deployable TFLite file of a model."""

    file: str
    kind: str  # float32 | float16 | dynamic_range | int8 | qat_int8 | pqat_int8 ...
    sha256: str = ""
    recipe: str = ""
    sparsity: float = 0.0
    io_dtype: str = "float32"
    metrics: dict = field(default_factory=dict)
    notes: str = ""


@dataclass
class Aggregation:
    """How slice probabilities become a study probability."""

    method: str = "top_k_mean"
    k: int = 2

    METHODS = ("max", "top_k_mean")

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ValueError(f"aggregation method must be one of {', '.join(self.METHODS)}, not {self.method!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"aggregation k must be a whole number >= 1, not {self.k!r}")


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: str
    contract: InputContract
    threshold: float = 0.5
    aggregation: Aggregation = field(default_factory=Aggregation)
    description: str = ""
    keras_file: str = ""
    variants: dict[str, Variant] = field(default_factory=dict)
    default_variant: str = "float32"
    default_variant_reason: str = ""
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    folder: Path | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every decision the app makes depends on the threshold: a card must not smuggle in NaN or 7.
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], not {self.threshold!r}")
        if not isinstance(self.files, dict) or not isinstance(self.variants, dict):
            raise ValueError("'files' and 'variants' must be objects")

    # --- serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        d["contract"] = self.contract.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, folder: Path | None = None) -> ModelCard:
        d = dict(d)
        d["contract"] = InputContract.from_dict(d["contract"])
        d["aggregation"] = Aggregation(**d.get("aggregation", {}))
        variants = d.get("variants", {})
        if not isinstance(variants, dict):
            raise ValueError("'variants' must be an object")
        d["variants"] = {k: Variant(**v) for k, v in variants.items()}
        return cls(**d, folder=folder)

    def save(self, folder: Path | None = None) -> Path:
        folder = Path(folder or self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        path = folder / CARD_FILE
        # Written beside and renamed over: an interrupted save leaves the old card, never half a card.
        partial = path.with_name(f".{CARD_FILE}.{os.getpid()}.tmp")
        try:
            with open(partial, "w") as f:
                f.write(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    # --- files and hashes ----------------------------------------------
    def path_of(self, relative: str) -> Path:
        if self.folder is None:
            raise ModelError(f"model card {self.name!r} is not attached to a folder")
        return self.folder / relative

    def record_hashes(self) -> None:
        """Hash every file the card names (keras file and variants) into ``files``."""
        names = [self.keras_file] if self.keras_file else []
        names += [v.file for v in self.variants.values()]
        for rel in names:
            digest = sha256_file(self.path_of(rel))
            self.files[rel] = digest
        for v in self.variants.values():
            v.sha256 = self.files[v.file]

    def verify(self, relative: str) -> Path:
        """Return the path of a listed file after checking it exists and matches its hash."""
        path = self.path_of(relative)
        if not path.is_file():
            raise ModelError(f"model file {path} is missing; reinstall the model {self.name!r}")
        expected = self.files.get(relative)
        if expected and sha256_file(path) != expected:
            raise ModelError(f"model file {path} does not match its card (sha256 differs); it is corrupt or was replaced")
        return path

    def variant(self, name: str | None = None) -> tuple[str, Variant]:
        if not self.variants:
            raise ModelError(f"model {self.name!r} has no TFLite files yet (e.g. just calibrated); make them with "
                             f"python -m quantize --model {self.folder or self.name} --recipe RECIPE")
        key = name or self.default_variant
        if key not in self.variants:
            raise ModelError(f"model {self.name!r} has no variant {key!r}; it has: {', '.join(sorted(self.variants))}")
        return key, self.variants[key]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(folder: Path) -> ModelCard:
    path = Path(folder) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"no model card at {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model card {path} is not valid JSON") from exc
    except OSError as exc:
        raise ModelError(f"model card {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        return ModelCard.from_dict(data, folder=Path(folder))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model card {path} is incomplete or malformed: {exc}") from exc


def default_model_name() -> str:
    try:
        return json.loads(REGISTRY_FILE.read_text())["default"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"no default model registered in {REGISTRY_FILE}") from exc


def resolve_model(name_or_path: str | Path | None = None) -> ModelCard:
    """Find a model by registry name, model folder, card file or TFLite file path.

    A ``.tflite`` path selects that file's variant of the card next to it.
    """
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = default_model_name()
    p = Path(name_or_path)
    if p.suffix == ".tflite":
        card = load_card(p.parent)
        for key, v in card.variants.items():
            if v.file == p.name:
                card.default_variant = key
                return card
        raise ModelError(f"{p} is not listed in the model card next to it")
    if p.name == CARD_FILE:
        return load_card(p.parent)
    if p.is_dir():
        return load_card(p)
    candidate = MODELS_DIR / str(name_or_path)
    if candidate.is_dir():
        return load_card(candidate)
    known = sorted(d.name for d in MODELS_DIR.iterdir() if (d / CARD_FILE).is_file()) if MODELS_DIR.is_dir() else []
    raise ModelError(f"unknown model {str(name_or_path)!r}; shipped models: {', '.join(known) or 'none'}")
