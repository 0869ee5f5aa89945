"""Where a compression run gets its data: phantom studies through the input contract.

``DataSources`` is three factories, so the pipeline holds no data between stages
and tests can inject their own. ``phantom_sources`` wires the training modules
(``model_zoo.dataset`` splits from the model's training config, ``model_zoo.data``
examples and tf.data stream): fine-tuning sees exactly what training saw, the
int8 calibration inputs are real contract tensors, and evaluation uses held-out
studies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from model_zoo.card import ModelCard, ModelError  # noqa: E402
from model_zoo.data import Augmentation, labelled_slices, make_example, make_train_dataset  # noqa: E402
from model_zoo.dataset import DEFAULT_CACHE, PreparedStudy, SplitSpec, load_scoring_split, load_split  # noqa: E402
from model_zoo.evaluate import parse_splits  # noqa: E402
from quantize.recipe import Recipe, RecipeError  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    # (batch_size, seed) -> endless batches of (image, {"probability": label (N, 1)})
    finetune: Callable[[int, int], tf.data.Dataset]
    # -> model inputs (H, W, C) float32 for full-integer calibration
    representative: Callable[[], Iterator[np.ndarray]]
    # -> held-out studies for the evaluation of every variant (called once, after the other two)
    evaluation: Callable[[], list[PreparedStudy]]


def representative_inputs(studies: list[PreparedStudy], card: ModelCard, n: int, seed: int) -> Iterator[np.ndarray]:
    """``n`` contract inputs, half from lesion slices (when there are enough), so calibration sees both classes."""
    positives, negatives = labelled_slices(studies)
    rng = np.random.default_rng(seed)
    n_pos = min(len(positives), n // 2)
    n_neg = min(len(negatives), n - n_pos)
    picks = np.concatenate([positives[rng.choice(len(positives), n_pos, replace=False)],
                            negatives[rng.choice(len(negatives), n_neg, replace=False)]])
    for s, k in picks:
        yield make_example(studies[int(s)], int(k), card.contract)


def phantom_sources(card: ModelCard, recipe: Recipe, cache_root: Path = DEFAULT_CACHE) -> DataSources:
    """Data sources from the splits of the model's training config (or ad-hoc NAME=SEED:N[:K] specs)."""
    uses = {recipe.finetune_split, recipe.representative_split, recipe.evaluation.split}
    specs = {spec.name: spec for spec in parse_splits(",".join(sorted(uses)), card)}

    def spec_of(use: str) -> SplitSpec:  # "test" or an ad-hoc "NAME=SEED:N[:K[:external]]"
        return specs[use.split("=", 1)[0]]

    evaluation = spec_of(recipe.evaluation.split)
    for use in (recipe.finetune_split, recipe.representative_split):
        if (spec_of(use).seed, spec_of(use).external) == (evaluation.seed, evaluation.external):
            raise RecipeError(f"recipe {recipe.name!r}: evaluation split {evaluation.name!r} is also used for "
                              f"fine-tuning or calibration ({use!r}); evaluation needs held-out studies")
    config = card.training.get("config", {})
    augmentation = Augmentation.from_dict(config.get("augmentation", {}))
    positive_fraction = float(config.get("training", {}).get("positive_fraction", 0.35))

    # A training split at the contract size is gigabytes: load it once for every fine-tuning
    # stage and the calibration, in training's compact form (int16 HU: 1200 studies in float32
    # did not fit in 23 GB), and let it go before the evaluation split comes in.
    loaded: dict[str, list[PreparedStudy]] = {}

    def load(use: str) -> list[PreparedStudy]:
        if use not in loaded:
            loaded[use] = load_split(spec_of(use), card.contract, cache_root, integer_hu=True)
            if not loaded[use]:
                raise ModelError(f"data split {use!r} has no studies")
        return loaded[use]

    def evaluation() -> list[PreparedStudy]:
        # As float32 with masks, 600 test studies came on top of the fine-tuning split's masks, which
        # its datasets still hold, and the OOM killer ended an alpha-0.5 run at 24 GB.
        loaded.clear()
        return load_scoring_split(spec_of(recipe.evaluation.split), card.contract, cache_root)

    def finetune(batch_size: int, seed: int) -> tf.data.Dataset:
        # The saved model has no auxiliary lesion-map head (training-only), so only the probability is a target.
        return make_train_dataset(load(recipe.finetune_split), card.contract, batch_size, augmentation, seed,
                                  positive_fraction=positive_fraction, lesion_map=False)

    def representative() -> Iterator[np.ndarray]:
        return representative_inputs(load(recipe.representative_split), card, recipe.representative_samples, recipe.seed)

    return DataSources(finetune=finetune, representative=representative, evaluation=evaluation)
