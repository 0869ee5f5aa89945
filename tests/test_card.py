import json

import pytest

from model_zoo.card import (
    MODELS_DIR,
    ModelCard,
    ModelError,
    Variant,
    default_model_name,
    load_card,
    resolve_model,
)
from model_zoo.contract import InputContract


def _card(folder):
    (folder / "m.tflite").write_bytes(b"model bytes")
    card = ModelCard(name="t", version="1", architecture="mobilenet_v2", contract=InputContract(),
                     variants={"float32": Variant(file="m.tflite", kind="float32")})
    card.folder = folder
    card.record_hashes()
    card.save(folder)
    return card


def test_card_round_trip_and_hashes(tmp_path):
    card = _card(tmp_path)
    loaded = load_card(tmp_path)
    assert loaded.to_dict() == card.to_dict()
    assert loaded.variants["float32"].sha256 == loaded.files["m.tflite"]
    assert loaded.verify("m.tflite") == tmp_path / "m.tflite"
    assert resolve_model(tmp_path / "m.tflite").default_variant == "float32"


def test_tampered_or_missing_file_is_reported(tmp_path):
    _card(tmp_path)
    (tmp_path / "m.tflite").write_bytes(b"other bytes")
    with pytest.raises(ModelError, match="does not match its card"):
        load_card(tmp_path).verify("m.tflite")
    (tmp_path / "m.tflite").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_card(tmp_path).verify("m.tflite")


def test_a_card_without_tflite_files_says_how_to_make_them(tmp_path):
    card = _card(tmp_path)
    assert card.variant()[0] == "float32"
    card.variants = {}  # as python -m model_zoo.calibrate leaves it
    with pytest.raises(ModelError, match="no TFLite files yet.*python -m quantize"):
        card.variant()


def test_bad_card_and_unknown_model(tmp_path):
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_card(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="malformed"):
        load_card(tmp_path)
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("no-such-model")


@pytest.mark.parametrize(("change", "message"), [
    ({"threshold": float("nan")}, "threshold must be a number in"),
    ({"threshold": None}, "threshold must be a number in"),
    ({"threshold": 7}, "threshold must be a number in"),
    ({"aggregation": {"method": "median"}}, "aggregation method must be one of"),
    ({"aggregation": {"method": "top_k_mean", "k": 0}}, "aggregation k"),
    ({"files": ["m.tflite"]}, "'files' and 'variants' must be objects"),
    ({"variants": ["float32"]}, "'variants' must be an object"),
    ({"variants": {"float32": "m.tflite"}}, "malformed"),
])
def test_a_card_that_would_change_decisions_silently_is_refused(tmp_path, change, message):
    _card(tmp_path)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ModelError, match=message):
        load_card(tmp_path)


def test_an_unreadable_card_is_a_model_error(tmp_path):
    (tmp_path / "card.json").mkdir()
    with pytest.raises(ModelError, match="cannot be read"):
        load_card(tmp_path)


SHIPPED_CARDS = sorted(MODELS_DIR.glob("*/card.json"))


def test_the_registry_names_a_shipped_model():
    assert SHIPPED_CARDS, f"no model is shipped under {MODELS_DIR}"
    assert resolve_model(None).name == default_model_name()


@pytest.mark.parametrize("card_file", SHIPPED_CARDS, ids=[p.parent.name for p in SHIPPED_CARDS])
def test_every_shipped_model_file_matches_its_card(card_file):
    card = load_card(card_file.parent)
    expected = {card.keras_file} | {v.file for v in card.variants.values()}
    assert set(card.files) == expected  # every file the card uses is hashed, and nothing else
    assert card.default_variant in card.variants
    for relative in card.files:
        card.verify(relative)  # raises on a missing file or a different sha256
    for variant in card.variants.values():
        assert variant.sha256 == card.files[variant.file]


def _phase_configs(training: dict) -> list[dict]:
    """The training configs of a card's phase and of every phase before it."""
    configs = []
    while training:
        configs.append(training["config"])
        training = training.get("previous_phase")
    return configs


@pytest.mark.parametrize("card_file", SHIPPED_CARDS, ids=[p.parent.name for p in SHIPPED_CARDS])
def test_no_phase_of_a_shipped_model_saw_its_held_out_studies(card_file):
    """Test and external studies (drawn from their own seeds) never fed training, epoch choice or calibration."""
    card = load_card(card_file.parent)
    configs = _phase_configs(card.training)
    fitted = {split["seed"] for cfg in configs for name, split in cfg["data"].items() if name not in ("test", "external")}
    assert fitted, "the card records no training data"
    for cfg in configs:
        held_out = [cfg["data"][name]["seed"] for name in ("test", "external") if name in cfg["data"]]
        assert held_out and not set(held_out) & fitted
        assert len(set(held_out)) == len(held_out)
    assert {cfg["data"]["test"]["seed"] for cfg in configs} == {configs[0]["data"]["test"]["seed"]}


def test_an_interrupted_save_leaves_the_previous_card(tmp_path, monkeypatch):
    import model_zoo.card

    card = _card(tmp_path)
    before = (tmp_path / "card.json").read_text()
    card.threshold = 0.123

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_zoo.card.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        card.save()
    assert (tmp_path / "card.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json", "m.tflite"]  # no partial file left
