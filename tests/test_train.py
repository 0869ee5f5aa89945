"""A tiny end-to-end training run: phantoms -> contract -> tf.data -> MobileNetV2 -> card."""

import json
from pathlib import Path

import numpy as np
import pytest

from model_zoo.card import load_card, sha256_file
from model_zoo.contract import InputContract

CONFIG = Path(__file__).resolve().parent.parent / "model_zoo" / "configs" / "tiny.json"
pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from model_zoo.train import load_config, train

    root = tmp_path_factory.mktemp("train")
    cfg = load_config(CONFIG)
    card = train(cfg, root / "model", root / "run", resume=False, max_minutes=None, cache_root=root / "cache")
    return cfg, card, root


def test_tiny_training_reduces_loss_and_writes_a_card(tiny_run):
    cfg, card, root = tiny_run
    losses = card.training["epoch_losses"]
    assert len(losses) == cfg["training"]["epochs"]
    assert losses[-1] < losses[0]
    loaded = load_card(root / "model")
    assert loaded.contract == InputContract.from_dict(cfg["contract"])
    assert 0.0 <= loaded.threshold <= 1.0
    for rel, digest in loaded.files.items():
        assert sha256_file(root / "model" / rel) == digest
    assert json.loads((root / "model" / "card.json").read_text())["training"]["seed"] == cfg["training"]["seed"]


def test_resume_continues_from_the_checkpoint(tiny_run):
    from model_zoo.train import train

    cfg, card, root = tiny_run
    cfg = dict(cfg, training=dict(cfg["training"], epochs=cfg["training"]["epochs"] + 1))
    resumed = train(cfg, root / "model2", root / "run", resume=True, max_minutes=None, cache_root=root / "cache")
    # Only the one extra epoch ran: the first three came from the checkpoint.
    assert len(resumed.training["epoch_losses"]) == 1
    assert resumed.training["epochs_run"] == cfg["training"]["epochs"]


def test_training_pipeline_matches_the_numpy_contract(tiny_run):
    """The tf.data path without augmentation yields exactly the contract's tensor."""
    from model_zoo.data import make_example, study_inputs
    from model_zoo.dataset import load_split, split_specs

    cfg, _card, root = tiny_run
    contract = InputContract.from_dict(cfg["contract"])
    study = load_split(split_specs(cfg)["val"], contract, root / "cache")[0]
    whole = study_inputs(study, contract)
    for k in (0, len(study.z_mm) // 2, len(study.z_mm) - 1):
        assert np.max(np.abs(make_example(study, k, contract) - whole[k])) <= 1e-5
