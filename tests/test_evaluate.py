"""model_zoo.evaluate: the clinical-study report, its files, the card update, and that it reproduces."""

from __future__ import annotations

import json

import pytest
from model_helpers import TINY_NAME, TINY_THRESHOLD, copy_model_folder, shared_tiny_model

from model_zoo.card import load_card
from model_zoo.dataset import SplitSpec, iter_split
from model_zoo.evaluate import format_table, main
from model_zoo.metrics import study_report

SPLITS = {"held": SplitSpec("held", seed=13, studies=8, slices=12),  # both classes (as in test_compare)
          "ext": SplitSpec("ext", seed=14, studies=4, slices=12, external=True)}
DATA = "held=13:8:12,ext=14:4:12:external"
REPORT_KEYS = {"n_studies", "n_positive", "auc", "threshold", "sensitivity", "specificity",
               "sensitivity_by_largest_lesion_mm", "specificity_by_hard_negative", "calibration"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def model(tmp_path_factory, tmp_path):
    return copy_model_folder(shared_tiny_model(tmp_path_factory), tmp_path / "model")  # --update-card writes to it


def test_evaluate_writes_the_report_updates_the_card_and_reproduces_it(model, tmp_path, capsys):
    common = ["--model", str(model), "--data", DATA, "--cache", str(tmp_path / "cache"), "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "first"), "--update-card"]) == 0
    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert (metrics["model"], metrics["variant"]) == (TINY_NAME, "float32")
    card = load_card(model)
    for name, split in SPLITS.items():
        report = metrics["splits"][name]
        truths = [study.truth for study in iter_split(split, card.contract, tmp_path / "cache")]
        assert REPORT_KEYS <= set(report)
        assert report["n_studies"] == split.studies
        assert report["n_positive"] == sum(bool(t["positive"]) for t in truths)
        assert report["threshold"] == TINY_THRESHOLD
        assert sum(bucket["n"] for bucket in report["sensitivity_by_largest_lesion_mm"].values()) == report["n_positive"]
        assert card.metrics[name] == report  # --update-card stored it
    held = metrics["splits"]["held"]["auc"]
    assert 0 < metrics["splits"]["held"]["n_positive"] < 8
    assert held["ci95"][0] <= held["value"] <= held["ci95"][1]
    assert card.metrics["evaluated_variant"] == "float32"
    for png in ("roc.png", "reliability.png"):
        assert (tmp_path / "first" / png).read_bytes().startswith(PNG)
    table = capsys.readouterr().out
    assert "| held | 8 (" in table and "| ext | 4 (" in table

    # Run again (issue 3: evaluate reproduces the card's metrics): the same numbers, and the card is untouched.
    assert main([*common, "--out", str(tmp_path / "second")]) == 0
    again = json.loads((tmp_path / "second" / "metrics.json").read_text())["splits"]
    assert again == {name: load_card(model).metrics[name] for name in SPLITS}


def test_an_unknown_split_or_model_is_a_one_line_error(model, tmp_path, capsys):
    assert main(["--model", str(model), "--data", "test"]) == 2  # the tiny card has no training config
    assert capsys.readouterr().err.startswith("error: unknown data split 'test'")
    for malformed in ("x=13", "x=13:a", "x=13:4:12:internal", "x=1:2:3:external:5"):
        assert main(["--model", str(model), "--data", malformed]) == 2
        assert capsys.readouterr().err == f"error: data split {malformed!r} is not NAME=SEED:N[:K[:external]]\n"
    (model / "model_float32.tflite").write_bytes(b"not a flatbuffer")
    model_card = load_card(model)
    model_card.record_hashes()
    model_card.save()  # a listed file LiteRT cannot load
    assert main(["--model", str(model), "--data", DATA]) == 2
    assert "cannot load TFLite model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--data", DATA]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_the_table_shows_undefined_metrics_as_na():
    """Size buckets without studies have no sensitivity: the table says n/a instead of crashing after the run."""
    positive = {"positive": True, "lesions": [{"diameter_mm": 12.0}], "hard_negatives": []}
    negative = {"positive": False, "lesions": [], "hard_negatives": []}
    table = format_table({"small": study_report([positive, positive, negative], [0.9, 0.2, 0.1], 0.5)})
    assert "| small | 3 (2) | 1.000 [" in table
    assert "<5: n/a (n=0)" in table and "10-20: 0.500 (n=2)" in table


def test_a_split_of_one_class_is_a_one_line_error(model, tmp_path, capsys):
    one_class = next(i for i in range(1, 50)
                     if all(s.truth["positive"] for s in iter_split(SplitSpec("one", seed=i, studies=2, slices=12),
                                                                   load_card(model).contract, tmp_path / "cache")))
    assert main(["--model", str(model), "--data", f"one={one_class}:2:12", "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: split 'one' cannot be scored: AUC needs both") and len(err.strip().splitlines()) == 1
