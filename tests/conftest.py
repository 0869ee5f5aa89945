"""Project-wide pytest set-up: TensorFlow settings before anything imports it, shared fixtures."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny end-to-end training run (configs/tiny.json): (config, card, root folder with model/, run/, cache/)."""
    from model_zoo.train import load_config, train

    root = tmp_path_factory.mktemp("train")
    cfg = load_config(Path(__file__).resolve().parent.parent / "model_zoo" / "configs" / "tiny.json")
    card = train(cfg, root / "model", root / "run", resume=False, max_minutes=None, cache_root=root / "cache")
    return cfg, card, root
