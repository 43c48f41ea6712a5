"""Readable results of a comparison: terminal table, results.json, results.csv, PNG plots.

Where the results carry latency (`pamfx.latency`), the table gets PAM's time over every other
method's in eager torch per batch size, beside the FLOPs ratio, the gains are listed per backend
and batch, the CSV gets one column per backend and batch, and latency.png plots latency gain
against FLOP gain per combination.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pamfx.atomic import atomic_path  # noqa: E402


def _atomic_write(path: Path, text: str | None = None, figure=None) -> Path:
    """Write ``text`` (or save ``figure`` as PNG) to ``path`` without ever leaving half a file."""
    with atomic_path(path) as tmp:
        if text is not None:
            tmp.write_text(text)
        else:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _pm(stat: dict[str, float], scale: float = 1.0, digits: int = 3, unit: str = "", spread: bool = True) -> str:
    """``mean ± std`` (just the mean when ``spread`` is off: one seed has no spread)."""
    mean = f"{stat['mean'] * scale:.{digits}f}{unit}"
    return f"{mean} ± {stat['std'] * scale:.{digits}f}{unit}" if spread else mean


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return lines


def _test_accuracy(run: dict[str, Any], task: str, method: str) -> float:
    """A task's test accuracy for ``method`` in one seed's results (from its single-task combination)."""
    return next(c["accuracy"][method][task] for c in run["combinations"] if c["tasks"] == [task])


def _start_gap(run: dict[str, Any], method: str) -> dict[str, float]:
    """Calibration accuracy minus the single-task reference, per task, of a method's unpruned
    network(s): the first checkpoint of its trajectories (after the fine-tune every method gets)."""
    reference = run["calib_reference_accuracy"]
    return {task: accuracy - reference[task] for trajectory in run["trajectories"][method].values()
            for task, accuracy in trajectory[0]["calib_accuracy"].items()}


def _latency_columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, batch) of the table's latency columns: eager torch, every method but PAM, largest batch first."""
    latency = summary["combinations"][0].get("latency")
    if not latency or "torch" not in latency["pam"]:
        return []
    batches = sorted(latency["pam"]["torch"], key=int, reverse=True)
    return [(m, b) for m in latency if m != "pam" for b in batches]


def _latency_lines(summary: dict[str, Any], spread: bool) -> list[str]:
    """One line per compared method and backend: PAM's latency gain at every batch size."""
    lines = []
    for method, backends in summary.get("latency_gain", {}).items():
        for backend, batches in backends.items():
            parts = [f"batch {batch} average {_pm(g['average'], digits=2, unit='x', spread=spread)}, "
                     f"peak {_pm(g['peak'], digits=2, unit='x', spread=spread)}"
                     for batch, g in sorted(batches.items(), key=lambda item: -int(item[0]))]
            lines.append(f"PAM latency gain over {method}, {backend}: " + "; ".join(parts))
    return lines


def _runs_lines(results: dict[str, Any]) -> list[str]:
    """How many pruning runs each method kept the best of, and how far one network's runs differ
    (max / min expected FLOPs of their matched selections): the pruner's run-to-run spread."""
    first = results["seeds"][0].get("pruning_runs", {})
    if all(len(runs) == 1 for method in first.values() for runs in method.values()):
        return []
    counts = ", ".join(
        f"{m} the best of {len(next(iter(runs.values())))} per network" if m == "baseline1" else
        f"{m} the best of {sum(len(r) for r in runs.values())}" + (f" ({len(next(iter(runs.values())))} per candidate)"
                                                                     if len(runs) > 1 else "")
        for m, runs in first.items())
    spreads = [max(f) / min(f) for seed in results["seeds"] for method in seed["pruning_runs"].values()
               for runs in method.values() if len(f := [r["expected_flops"] for r in runs if r["matched"]]) > 1]
    line = f"pruning runs (the cheapest matched selection on the calibration split is kept): {counts}"
    if spreads:
        line += (f"; one network's matched runs differ by up to {max(spreads):.2f}x in expected FLOPs "
                 f"(median {statistics.median(spreads):.2f}x over {len(spreads)} networks)")
    return [line]


def format_table(results: dict[str, Any]) -> str:
    """Per combination: MFLOPs, time ratio (where measured) and test accuracy of every method (mean ±
    std over seeds), then the gains."""
    summary = results["summary"]
    methods = list(summary["combinations"][0]["flops"])
    spread = len(summary["seeds"]) > 1
    timed = _latency_columns(summary)
    header = (["tasks"] + [f"MFLOPs {m}" for m in methods] + ["pam/" + m for m in methods if m != "pam"]
              + [f"time pam/{m} b{b}" for m, b in timed] + [f"acc {m}" for m in methods])
    rows = []
    for combo in summary["combinations"]:
        flops = combo["flops"]
        rows.append(
            ["&".join(combo["tasks"])]
            + [_pm(flops[m], 1e-6, spread=spread) for m in methods]
            + [f"{flops['pam']['mean'] / flops[m]['mean']:.2f}" for m in methods if m != "pam"]
            + [f"{combo['latency']['pam']['torch'][b]['mean'] / combo['latency'][m]['torch'][b]['mean']:.2f}" for m, b in timed]
            + [_pm(combo["accuracy"][m], 100, 2, "%", spread) for m in methods]
        )
    lines = _table(header, rows)
    tolerance = results["config"]["tolerance"]
    n = len(summary["seeds"])
    ref = ", ".join(f"{t}: {_pm(a, 100, 2, '%', spread)}" for t, a in summary["reference_accuracy"].items())
    lines += ["", f"unpruned single-task test accuracy: {ref}"]
    for base, gain in summary["gain"].items():
        lines.append(f"PAM gain over {base}: average {_pm(gain['average'], digits=2, unit='x', spread=spread)}, "
                     f"peak {_pm(gain['peak'], digits=2, unit='x', spread=spread)} (FLOPs ratio, {n} seed{'s' * (n > 1)})")
    lines += _latency_lines(summary, spread)
    if isinstance(results["config"]["alpha"], list):
        lines.append(f"PAM's α, chosen per seed on the calibration split from {results['config']['alpha']}: "
                     + ", ".join(f"seed {run['seed']}: {run['alpha']:g}" for run in results["seeds"]))
    chosen = [(run["seed"], run["grouping"]) for run in results["seeds"] if run.get("grouping")]
    if chosen:
        lines.append("PAM's grouping, chosen per seed on the calibration split after pruning the regrouped and the "
                     "unshared merge (expected MFLOPs of each selection): " + ", ".join(
                         f"seed {seed}: {g['chosen']} (" + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in g["expected_flops"].items())
                         + ")" for seed, g in chosen))
    lines += _runs_lines(results)
    for base in summary["test_accuracy_gap_pam_minus"]:
        for task in results["tasks"]:
            gaps = [_test_accuracy(run, task, "pam") - _test_accuracy(run, task, base) for run in results["seeds"]]
            off = [f"seed {run['seed']}: {100 * g:+.2f}" for run, g in zip(results["seeds"], gaps) if abs(g) > tolerance]
            if off:
                lines.append(f"note: {task}: PAM's test accuracy differs from {base}'s by more than the tolerance of "
                             f"{100 * tolerance:.2f} points ({', '.join(off)}): those costs are not at matched accuracy")
    for method in methods:
        starts = [f"seed {run['seed']}: {task} {100 * gap:+.2f}" for run in results["seeds"]
                  for task, gap in _start_gap(run, method).items() if gap < -tolerance]
        if starts:
            lines.append(f"note: {method}: before any pruning the network is already more than the tolerance below the "
                         f"single-task reference on the calibration split ({', '.join(starts)} points); only checkpoints "
                         "that fine-tuning between rounds brings back can be matched")
    for method, matched in summary["matched"].items():
        if not matched:
            lines.append(f"note: {method}: on some seed no checkpoint kept every task within the tolerance on the "
                         "calibration split; its least-deficient checkpoint is reported")
    lines.append(f"selection: {results['selection']}")
    if timed:
        clock = "CPU time" if results["config"].get("latency_clock", "cpu") == "cpu" else "wall time"
        lines.append(f"time: emitted modules (torch) and exported ONNX files (onnxruntime), 1 thread, median {clock} of "
                     "interleaved runs; baseline 1 runs its networks of the combination one after another")
    return "\n".join(lines)


def write_csv(results: dict[str, Any], path: Path) -> Path:
    """One row per seed, combination and method."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    latency = results["seeds"][0]["combinations"][0].get("latency")
    timed = [(backend, batch) for backend, batches in latency["pam"].items() for batch in batches] if latency else []
    writer.writerow(["seed", "tasks", "method", "flops", "params", "mean_accuracy"]
                    + [f"latency_ms_{backend}_batch{batch}" for backend, batch in timed])
    for run in results["seeds"]:
        for combo in run["combinations"]:
            for m, flops in combo["flops"].items():
                acc = combo["accuracy"][m]
                writer.writerow([run["seed"], "&".join(combo["tasks"]), m, flops, combo["params"][m],
                                 sum(acc.values()) / len(acc)]
                                + [1e3 * combo["latency"][m][backend][batch] for backend, batch in timed])
    return _atomic_write(path, buffer.getvalue())


def _grouped_bars(series: dict[str, list[float]], labels: list[str], ylabel: str, title: str, path: Path,
                  ylim: tuple[float, float] | None = None) -> Path:
    """One bar per (label, series), grouped by label, saved atomically as a PNG."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 3), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend()
    try:
        return _atomic_write(path, figure=fig)
    finally:
        plt.close(fig)


def plot_flops(results: dict[str, Any], path: Path) -> Path:
    """FLOPs of every task combination (mean over seeds), one bar per method."""
    combos = results["summary"]["combinations"]
    series = {m: [c["flops"][m]["mean"] / 1e6 for c in combos] for m in combos[0]["flops"]}
    labels = ["&".join(c["tasks"]) for c in combos]
    return _grouped_bars(series, labels, "MFLOPs per sample", "Cost of every task combination after pruning", path)


def plot_frontier(results: dict[str, Any], path: Path, most: int = 8) -> Path:
    """Per combination (single tasks and all tasks first, at most ``most``), FLOPs against the allowed
    calibration-accuracy drop, one line per method (mean over seeds, band = ± std)."""
    runs = results["seeds"]
    tolerances = [100 * d for d in runs[0]["frontier"]["tolerances"]]
    names = sorted(runs[0]["frontier"]["flops"], key=lambda n: (0 if n.count("&") in (0, len(results["tasks"]) - 1) else 1,
                                                                   n.count("&")))[:most]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method in runs[0]["frontier"]["flops"][name]:
            curves = [[f / 1e6 for f in r["frontier"]["flops"][name][method]] for r in runs]
            mean = [sum(v) / len(v) for v in zip(*curves)]
            spread = [(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5 for v, m in zip(zip(*curves), mean)]
            ax.plot(tolerances, mean, marker="o", markersize=3, label=method)
            ax.fill_between(tolerances, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            alpha=0.2)
        ax.axvline(100 * results["config"]["tolerance"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("allowed accuracy drop (points)")
    axes[0][0].set_ylabel("MFLOPs per sample")
    axes[0][0].legend()
    fig.suptitle("FLOPs-accuracy frontier (dotted: the tolerance used)")
    try:
        return _atomic_write(path, figure=fig)
    finally:
        plt.close(fig)


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    """Latency gain against FLOP gain of PAM over every other method, one point per combination and
    backend / batch (mean over seeds, bars = ± std); on the diagonal, time follows FLOPs."""
    combos = results["summary"]["combinations"]
    bases = list(combos[0]["latency_gain"])
    fig, axes = plt.subplots(1, len(bases), figsize=(5 * len(bases), 4.2), squeeze=False)
    for ax, base in zip(axes[0], bases):
        flop_gain = [c["flops"][base]["mean"] / c["flops"]["pam"]["mean"] for c in combos]
        series = [(backend, batch) for backend, batches in combos[0]["latency_gain"][base].items()
                  for batch in sorted(batches, key=int, reverse=True)]
        for backend, batch in series:
            gains = [c["latency_gain"][base][backend][batch] for c in combos]
            ax.errorbar(flop_gain, [g["mean"] for g in gains], yerr=[g["std"] for g in gains], fmt="o",
                        markersize=4, capsize=2, label=f"{backend}, batch {batch}")
        if len(combos) <= 7:  # name the points of the first series
            backend, batch = series[0]
            for c, x in zip(combos, flop_gain):
                ax.annotate("&".join(c["tasks"]), (x, c["latency_gain"][base][backend][batch]["mean"]), fontsize=7)
        ends = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(ends, ends, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"FLOP gain (FLOPs {base} / FLOPs pam)")
        ax.set_ylabel(f"latency gain (t {base} / t pam)")
        ax.set_title(f"PAM vs {base}, every combination", fontsize=9)
        ax.legend(fontsize=7)
    try:
        return _atomic_write(path, figure=fig)
    finally:
        plt.close(fig)


def plot_sharing(results: dict[str, Any], path: Path) -> Path:
    """Share of each layer's channels used by every task, after merging and after pruning (Fig. 4.6), first seed."""
    stages = results["seeds"][0]["sharing_ratio"]
    layers = list(next(iter(stages.values())))
    series = {stage: [100 * ratios[l] for l in layers] for stage, ratios in stages.items()}
    return _grouped_bars(series, layers, "shared by all tasks (%)", "Sharing ratio per layer (Fig. 4.6)", path, (0, 100))


def write_report(results: dict[str, Any], out_dir: Path, regrouping=None) -> dict[str, Path]:
    """Write results.json, results.csv and the PNG plots into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {
        "json": _atomic_write(out_dir / "results.json", json.dumps(results, indent=2)),
        "csv": write_csv(results, out_dir / "results.csv"),
        "flops_plot": plot_flops(results, out_dir / "flops_per_combination.png"),
        "frontier_plot": plot_frontier(results, out_dir / "frontier.png"),
        "sharing_plot": plot_sharing(results, out_dir / "sharing_ratio.png"),
    }
    if results["summary"].get("latency_gain"):  # measured, and a method besides PAM to compare with
        paths["latency_plot"] = plot_latency(results, out_dir / "latency.png")
    if regrouping is not None:
        paths["alpha_trace_plot"] = plot_alpha_trace(regrouping, out_dir / "alpha_trace.png")
    return paths


def plot_alpha_trace(regrouping, path: Path) -> Path:
    """Fig. 4.7: the α trace of ``regrouping`` (a `RegroupResult`), written atomically to ``path``."""
    with atomic_path(path) as tmp:
        regrouping.plot_trace(str(tmp))
    return Path(path)
