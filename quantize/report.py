"""Choose the app's default variant, check the acceptance criteria, write report.md and the plot.

Everything here works on the numbers ``quantize.measure`` produced in this run;
nothing is typed in by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from quantize.recipe import REFERENCE_VARIANT, AcceptanceConfig, SelectionConfig

log = logging.getLogger(__name__)
REPORT_FILE = "report.md"
MEANINGFUL_AUC = 0.7  # below this the float model's accuracy is too weak for accuracy comparisons to mean anything
PLOT_FILE = "compression.png"


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _latency_key(threads: int) -> str:
    return f"latency_ms_{threads}t"


def _auc_drop(m: dict, ref: dict) -> float | None:
    if m.get("auc") is None or ref.get("auc") is None:
        return None
    return ref["auc"] - m["auc"]


def choose_default(metrics: dict[str, dict], selection: SelectionConfig) -> tuple[str, str]:
    """The fastest variant that is as good as float32 within the recipe's limits; smaller gzip breaks near-ties.

    Eligible: AUC drop <= max_auc_drop, sensitivity drop <= max_sensitivity_drop and
    at most max_study_flips study decisions different from float32. float32 is
    always eligible, so there is always a default.
    """
    ref = metrics[REFERENCE_VARIANT]
    key = _latency_key(selection.latency_threads)
    eligible, excluded = [], []
    for name, m in metrics.items():
        reasons = []
        drop = _auc_drop(m, ref)
        if drop is not None and drop > selection.max_auc_drop:
            reasons.append(f"AUC {m['auc']:.4f} vs {ref['auc']:.4f}")
        if None not in (m.get("sensitivity"), ref.get("sensitivity")) and \
                ref["sensitivity"] - m["sensitivity"] > selection.max_sensitivity_drop:
            reasons.append(f"sensitivity {m['sensitivity']:.3f} vs {ref['sensitivity']:.3f}")
        if m.get("study_flips", 0) > selection.max_study_flips:
            reasons.append(f"{m['study_flips']} study decisions differ from float32")
        (excluded if reasons else eligible).append((name, "; ".join(reasons)))
    names = [n for n, _ in eligible]
    fastest = min(metrics[n][key] for n in names)
    near = [n for n in names if metrics[n][key] <= fastest * (1.0 + selection.latency_tolerance)]
    choice = min(near, key=lambda n: (metrics[n]["gzip_bytes"], n))
    m = metrics[choice]
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.4f} (float32 {ref['auc']:.4f})"
    reason = (
        f"{choice}: {m[key]:.2f} ms/slice at {selection.latency_threads} threads (float32 {ref[key]:.2f}; "
        f"variants within {selection.latency_tolerance:.0%} of the fastest eligible tie), "
        f"{m['gzip_bytes'] / 1024:.0f} KB gzip (float32 {ref['gzip_bytes'] / 1024:.0f} KB), AUC {auc}, "
        f"{m.get('study_flips', 0)} study decisions changed vs float32."
    )
    if excluded:
        reason += " Not eligible: " + "; ".join(f"{n} ({why})" for n, why in excluded) + "."
    return choice, reason


def check_acceptance(metrics: dict[str, dict], acceptance: AcceptanceConfig) -> list[Check]:
    """The issue's criteria for one variant (PQAT int8 by default), each with the measured numbers."""
    m, ref = metrics[acceptance.variant], metrics[REFERENCE_VARIANT]
    drop = _auc_drop(m, ref)
    size = m["bytes"] / ref["bytes"]
    gz = m["gzip_bytes"] / ref["gzip_bytes"]
    # "Within" either way: a variant far better than float32 is a different model, not a compressed copy.
    return [
        Check(f"AUC within {acceptance.max_auc_drop} of float32", drop is not None and abs(drop) <= acceptance.max_auc_drop,
              "AUC not measurable (one class only)" if drop is None else f"{m['auc']:.4f} vs {ref['auc']:.4f} ({-drop:+.4f})"),
        Check(f"TFLite bytes <= {acceptance.max_size_ratio:.0%} of float32", size <= acceptance.max_size_ratio,
              f"{m['bytes']:,} / {ref['bytes']:,} = {size:.1%}"),
        Check(f"gzip bytes <= {acceptance.max_gzip_ratio:.0%} of float32 gzip", gz <= acceptance.max_gzip_ratio,
              f"{m['gzip_bytes']:,} / {ref['gzip_bytes']:,} = {gz:.1%}"),
        Check(f"sparsity >= {acceptance.min_sparsity:.0%} of prunable weights", m["sparsity"] >= acceptance.min_sparsity,
              f"{m['sparsity']:.1%}"),
    ]


def plot(metrics: dict[str, dict], path: Path, latency_threads: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _latency_key(latency_threads)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = ((axes[0], "gzip_bytes", 1 / 1024, "gzip size (KB)"), (axes[1], key, 1.0,
              f"latency per slice, {latency_threads} threads (ms)"))
    for ax, field, scale, label in panels:
        for name, m in metrics.items():
            if m.get("auc") is None:
                continue
            ax.scatter(m[field] * scale, m["auc"], s=40)
            ax.annotate(name, (m[field] * scale, m["auc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(xlabel=label, ylabel="study AUC (held-out)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    fig.suptitle("Compressed variants: accuracy against size and speed (LiteRT, this machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def variant_table(metrics: dict[str, dict], threads: tuple[int, ...]) -> str:
    ref = metrics[REFERENCE_VARIANT]
    head = ["variant", "kind", "I/O", "sparsity", "zeros stored", "bytes", "% float", "gzip bytes", "% float gzip",
            "AUC [95% CI]", "sens", "spec", "max \\|dp\\|", "mean \\|dp\\|", "study flips", "slice flips",
            *[f"ms/slice {t}T" for t in threads], "peak MB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        ci = m.get("auc_ci95")
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        cells = [
            name, m["kind"], m["io_dtype"], f"{m['sparsity']:.1%}",
            "n/a" if m.get("stored_conv_sparsity") is None else f"{m['stored_conv_sparsity']:.1%}",
            f"{m['bytes']:,}", f"{m['bytes'] / ref['bytes']:.1%}", f"{m['gzip_bytes']:,}",
            f"{m['gzip_bytes'] / ref['gzip_bytes']:.1%}", auc, _fmt(m.get("sensitivity"), ".3f"),
            _fmt(m.get("specificity"), ".3f"), _fmt(m.get("max_abs_dp"), ".4f"), _fmt(m.get("mean_abs_dp"), ".5f"),
            str(m.get("study_flips", 0)), str(m.get("slice_flips", 0)),
            *[f"{m[_latency_key(t)]:.2f}" for t in threads], _fmt(m.get("peak_mb"), ".0f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def layer_table(rows: list[dict]) -> str:
    out = ["| layer | kind | weights | zeros | sparsity |", "|---|---|---|---|---|"]
    for r in rows:
        sparsity = f"{r['sparsity']:.1%}" if r["prunable"] else f"{r['sparsity']:.1%} (not prunable: tfmot skips DepthwiseConv2D)"
        out.append(f"| {r['layer']} | {r['kind']} | {r['weights']:,} | {r['zeros']:,} | {sparsity} |")
    return "\n".join(out)


def write_report(path: Path, *, header: dict, metrics: dict[str, dict], threads: tuple[int, ...],
                 default: tuple[str, str], acceptance: list[Check] | None, acceptance_variant: str | None,
                 layers: dict[str, list[dict]], losses: dict[str, list[float]], plot_file: str) -> Path:
    """report.md: every variant with the numbers measured by this run."""
    lines = [f"# Compression report: {header['model']} {header['version']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("model", "version")]
    ref_auc = metrics[REFERENCE_VARIANT].get("auc")
    if ref_auc is not None and ref_auc < MEANINGFUL_AUC:
        lines += ["", f"**Warning: the float model's AUC on these studies is {ref_auc:.3f}: it does not discriminate, so "
                      "the accuracy and agreement columns (and the AUC acceptance check) say nothing about compression "
                      "until it is retrained.** Sizes, sparsity, latency and memory are valid."]
    lines += ["", "## Variants", "",
              "Measured with LiteRT (`model_zoo.litert.TFLiteModel`, XNNPACK) on the evaluation studies above; "
              "agreement is against `float32` (|dp| over slice probabilities; flips = decisions at the card "
              "threshold that differ, per study and per slice). Sparsity = zeros among prunable weights (Conv2D/Dense "
              "kernels) of the Keras model the file came from; zeros stored = exact zeros in the file's CONV_2D "
              "weights (rounding to int8 adds some). Latency = median per slice of timed calls, all variants timed "
              "in turn (round-robin) so background load affects them alike; peak MB = peak "
              "resident memory of a fresh process that loads the file and runs one batch.", "",
              variant_table(metrics, threads), "", f"![AUC against size and latency]({plot_file})", "",
              "## Default variant for the app", "", f"**{default[0]}** - {default[1]}", ""]
    if acceptance is not None:
        verdict = "PASSED" if all(c.passed for c in acceptance) else "FAILED"
        lines += [f"## Acceptance ({acceptance_variant}): {verdict}", "", "| criterion | measured | result |", "|---|---|---|"]
        lines += [f"| {c.name} | {c.detail} | {'pass' if c.passed else 'FAIL'} |" for c in acceptance]
        lines.append("")
    lines += ["## Notes", "",
              "- DepthwiseConv2D kernels are never pruned by tfmot; their share of the weights caps the reachable "
              "overall sparsity.",
              "- Pruning buys compressed size (gzip), not speed: XNNPACK on x86 runs zero weights like any other.",
              "- int8 is not automatically faster than float32 on an x86 CPU with XNNPACK, whatever its SIMD features "
              "(listed above): the latency columns are measured on this machine, not assumed.", ""]
    for name, rows in layers.items():
        lines += [f"<details><summary>Per-layer sparsity: {name}</summary>", "", layer_table(rows), "", "</details>", ""]
    if losses:
        lines += ["## Fine-tuning (distillation: MSE, above a floor, between the variant's and the float model's cam logits and their maximum)", ""]
        lines += [f"- {stage}: running mean loss {', '.join(f'{v:.5f}' for v in values)}" for stage, values in losses.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
