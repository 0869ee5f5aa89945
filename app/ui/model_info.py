"""The model card as the clinician sees it: identity, operating point and validation metrics.

Reads the card written by ``model_zoo.train`` / ``model_zoo.evaluate``: ``card.metrics``
maps a split name ("validation", "test", "external") to a report whose metrics are
numbers or ``{"value": x, "ci95": [low, high], ...}``. Missing metrics show as "-".
"""

from __future__ import annotations

from app.domain import ModelRef
from model_zoo.card import ModelCard

METRIC_COLUMNS = (("auc", "AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"))


def _value(metric) -> float | None:
    if isinstance(metric, int | float) and not isinstance(metric, bool):
        return float(metric)
    if isinstance(metric, dict) and isinstance(metric.get("value"), int | float):
        return float(metric["value"])
    return None


def _formatted(metric) -> str:
    value = _value(metric)
    if value is None:
        return "-"
    ci = metric.get("ci95") if isinstance(metric, dict) else None
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return f"{value:.3f} [{float(ci[0]):.3f}, {float(ci[1]):.3f}]"
    return f"{value:.3f}"


def card_facts(card: ModelCard, ref: ModelRef) -> list[tuple[str, str]]:
    """(label, value) pairs: who the model is and how it decides."""
    variant = card.variants.get(ref.variant)
    kind = f" ({variant.kind})" if variant and variant.kind != ref.variant else ""
    facts = [
        ("Name", card.name),
        ("Version", card.version),
        ("Variant", f"{ref.variant}{kind}"),
        ("Architecture", card.architecture),
        ("Decision threshold", f"{card.threshold:.3f}"),
        ("Study score", f"{card.aggregation.method.replace('_', ' ')} (k = {card.aggregation.k}) of slice probabilities"),
        ("Probabilities", _calibration_fact(card.training.get("calibration"))),
        ("File sha256", ref.sha256),
    ]
    if card.description:
        facts.append(("Description", card.description))
    return facts


def _calibration_fact(record: dict | None) -> str:
    """Whether a probability can be read as one (``model_zoo.calibrate``'s record in the card)."""
    if not isinstance(record, dict):
        return "not calibrated: a score for ranking, not the chance of disease"
    return (f"calibrated on the {record.get('fitted_on', 'validation split')} (expected calibration error there "
            f"{record.get('val_ece_before', '?')} -> {record.get('val_ece_after', '?')}; held-out: the ECE column below)")


def metrics_table(metrics: dict) -> list[dict[str, str]]:
    """One row per evaluated split with the headline metrics (AUC with 95% CI, sensitivity, specificity)."""
    rows = []
    for split, report in metrics.items():
        if not isinstance(report, dict):
            continue
        row = {"Split": split}
        if "n_studies" in report:
            row["Studies (positive)"] = f"{report['n_studies']} ({report.get('n_positive', '?')})"
        for key, label in METRIC_COLUMNS:
            row[label] = _formatted(report.get(key))
        ece = report.get("calibration", {}).get("ece") if isinstance(report.get("calibration"), dict) else None
        row["ECE"] = _formatted(ece)
        if any(row[label] != "-" for _, label in METRIC_COLUMNS):
            rows.append(row)
    return rows
