"""model_zoo.compare: two models on the same studies, the AUC difference with a paired CI."""

from __future__ import annotations

import json

import pytest
from model_helpers import shared_tiny_model

from model_zoo.compare import SplitComparison, main
from model_zoo.metrics import Interval

SPLIT = "held=13:8:12"  # 8 small phantom studies (both classes), prepared into a temp cache


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def test_a_model_against_itself_shows_no_difference(tiny_model, tmp_path, capsys):
    out = tmp_path / "compare.json"
    code = main([str(tiny_model), str(tiny_model), "--data", SPLIT, "--cache", str(tmp_path / "cache"),
                 "--threads", "1", "--json", str(out)])
    assert code == 0
    split = json.loads(out.read_text())["splits"][0]
    assert (split["split"], split["n_studies"]) == ("held", 8) and 0 < split["n_positive"] < 8
    assert split["auc_a"] == split["auc_b"]
    assert split["auc_difference_b_minus_a"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert split["verdict"] == "no difference shown"
    table = capsys.readouterr().out
    assert "| held | 8 (" in table and "no difference shown" in table and "tiny-test 0.0.1 (float32" in table


def test_a_missing_model_an_unknown_split_or_an_unwritable_json_is_a_one_line_error(tiny_model, tmp_path, capsys):
    assert main([str(tiny_model), str(tmp_path / "nowhere"), "--data", SPLIT]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main([str(tiny_model), str(tiny_model), "--data", "test"]) == 2  # the tiny card has no training config
    assert "unknown data split 'test'" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main([str(tiny_model), str(tiny_model), "--data", SPLIT, "--cache", str(tmp_path / "cache"),
                 "--json", str(blocked / "compare.json")]) == 2  # a file where the folder should be
    assert capsys.readouterr().err.startswith(f"error: cannot write {blocked / 'compare.json'}")


@pytest.mark.parametrize(("low", "high", "verdict"), [(0.01, 0.05, "B better"), (-0.05, -0.01, "A better"),
                                                      (-0.01, 0.03, "no difference shown")])
def test_the_verdict_needs_an_interval_that_excludes_zero(low, high, verdict):
    auc = Interval(0.8, 0.7, 0.9)
    row = SplitComparison("test", 100, 50, auc, auc, Interval((low + high) / 2, low, high))
    assert row.verdict == verdict and row.to_json()["verdict"] == verdict
