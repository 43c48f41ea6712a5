"""``pamfx reproduce``: the experiments of Sec. 4.6 re-measured on the tiled-digit data, as one document.

Every section is a configuration of the comparison in `pamfx.experiment` (same pruner, schedule
and matched-accuracy selection for every method), run over the plan's seeds:

- Tables 4.2 / 4.4 / 4.5: LeNet-5 with 2 tasks (P1, P2), a VGG-style network with 5 tasks (P1, P2)
  and a ResNet-style network with 2 tasks (P2), baseline 1, baseline 2 (MTZ) and PAM;
- Fig. 4.5 (average and peak gains), Fig. 4.6 (sharing ratio per layer after pruning) and
  Fig. 4.7 (the α trace) from those runs;
- Sec. 4.6.3.1: PAM for several α, the single-task versus joint cost trade-off;
- Sec. 4.6.3.2: task pairs of increasing label overlap (`overlap_split`), relatedness I(Y^A; Y^B);
- Sec. 4.6.3.3: task inclusion, B's labels a subset of A's (`inclusion_split`).

The output folder gets ``REPRODUCTION.md`` (our numbers as mean ± std over the seeds beside the
paper's), its plots, and one sub-folder per run with `pamfx.report.write_report`'s files. All
choices are made on the calibration split (the fixed α and tolerance of the plan, the cheapest
checkpoint within the tolerance); the test split is only evaluated. A run whose ``results.json``
already holds the same configuration is read back, and so is every seed a run saved before it was
cut off (``<run>/seeds/seed-<k>.json``), so an interrupted reproduction resumes.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pamfx.atomic import atomic_path  # noqa: E402
from pamfx.data import inclusion_split, load_dataset, overlap_split  # noqa: E402
from pamfx.errors import InputError  # noqa: E402
from pamfx.experiment import METHOD_COLUMNS, SAVED_BEFORE_KEY, ExperimentConfig, results_from_seeds, run_seed, seed_results  # noqa: E402
from pamfx.report import format_table, plot_alpha_trace, write_report  # noqa: E402

Results = dict[str, Any]
LETTERS = "ABCDE"

#: The paper's Table 4.2 (LeNet-5, multi-label Fashion-MNIST): per combination, test accuracy (%)
#: and MFLOPs of baseline 1, baseline 2 and PAM.
PAPER_TABLE_4_2 = {
    "P1": {"A": ((95.42, 95.30, 94.67), (28.34, 52.58, 28.49)),
           "B": ((96.30, 96.40, 95.70), (28.34, 52.58, 26.16)),
           "A&B": ((95.86, 95.85, 95.19), (56.69, 52.58, 48.68))},
    "P2": {"A": ((95.82, 95.73, 95.70), (18.64, 31.19, 18.65)),
           "B": ((96.46, 96.72, 96.38), (18.64, 31.19, 18.65)),
           "A&B": ((96.14, 96.22, 96.04), (37.27, 31.19, 26.48))},
}
#: The rows of the paper's Table 4.4 (VGG-16, LFW, 5 tasks) that its text gives legibly.
PAPER_TABLE_4_4 = {
    "P1": {"A": ((89.77, 89.49, 89.87), (7.96, 12.66, 7.94)),
           "B": ((82.81, 82.82, 82.14), (7.91, 12.66, 7.95)),
           "C": ((83.20, 82.68, 83.30), (7.94, 12.66, 7.94)),
           "A&B&C&D&E": ((85.72, 85.59, 85.65), (39.27, 12.66, 8.06))},
    "P2": {"A": ((89.57, 89.38, 89.24), (22.91, 36.33, 23.28)),
           "B": ((81.96, 83.15, 83.39), (23.16, 36.33, 23.29)),
           "C": ((82.96, 81.61, 82.10), (22.93, 36.33, 23.28)),
           "A&B&C&D&E": ((85.19, 85.01, 85.12), (111.44, 36.33, 23.39))},
}
#: Sec. 4.6.2 / Fig. 4.5: the range over the paper's settings of PAM's average and peak gains.
PAPER_GAINS = {"baseline1": {"average": (1.07, 1.64), "peak": (1.16, 4.87)},
               "mtz": {"average": (1.51, 1.69), "peak": (1.56, 2.01)}}
PAPER_TABLES = {"4.2": PAPER_TABLE_4_2, "4.4": PAPER_TABLE_4_4}
SECTION_TITLES = {
    "gains": "Fig. 4.5 analogue: average and peak gains",
    "sharing": "Fig. 4.6 analogue: sharing ratio per layer after pruning",
    "trace": "Fig. 4.7 analogue: the α trace",
    "sweep": "Sec. 4.6.3.1 analogue: α sweep, single-task versus joint cost",
    "relatedness": "Sec. 4.6.3.2 analogue: task relatedness",
    "inclusion": "Sec. 4.6.3.3 analogue: task inclusion",
}
TABLE_TITLES = {
    "4.2": "Table 4.2 analogue: LeNet-5, 2 tasks (paper: LeNet-5 on multi-label Fashion-MNIST)",
    "4.4": "Table 4.4 analogue: VGG-style network, 5 tasks (paper: VGG-16 on LFW, 5 tasks)",
    "4.5": "Table 4.5 analogue: ResNet-style network, 2 tasks, P2 (paper: ResNet-18/34 on CelebA)",
}
PRUNER_NAMES = {"P1": "vib", "P2": "taylor"}
#: The table setting whose baseline 1 the α sweep reuses when it prunes the same networks.
SWEEP_BASELINE = "4.2-P2"


@dataclass(frozen=True)
class ReproductionPlan:
    """What `reproduce` runs. ``common`` holds `ExperimentConfig` keys for every run; ``tables`` maps
    a setting (``"4.2-P1"``: paper table and pruner) to its own keys; ``ablation`` holds the keys of
    the α sweep, relatedness and inclusion runs (2 tasks, PAM and baseline 1)."""

    name: str
    seeds: list[int]
    common: dict[str, Any]
    tables: dict[str, dict[str, Any]]
    ablation: dict[str, Any]
    alphas: list[float]
    overlaps: list[int]
    task_size: int = 5
    inclusion: tuple[int, int] = (10, 5)

    def table_config(self, setting: str) -> ExperimentConfig:
        pruner = setting.split("-")[1]
        values = {**self.common, **self.tables[setting], "pruner": PRUNER_NAMES[pruner], "seeds": self.seeds}
        return ExperimentConfig.from_mapping(values)

    def ablation_config(self, **values: Any) -> ExperimentConfig:
        return ExperimentConfig.from_mapping({**self.common, **self.ablation, "seeds": self.seeds, **values})

    def validate(self) -> None:
        """Build every configuration and label split of the plan, so that a bad one fails before any run."""
        for setting in self.tables:
            if setting.split("-")[0] not in TABLE_TITLES or setting.split("-")[-1] not in PRUNER_NAMES:
                raise InputError(f"plan {self.name!r}: unknown setting {setting!r}; settings are <table>-<pruner> with "
                                 f"table in {sorted(TABLE_TITLES)} and pruner in {sorted(PRUNER_NAMES)}")
            self.table_config(setting)
        for alpha in self.alphas:
            self.ablation_config(alpha=alpha)
        for overlap in self.overlaps:
            overlap_split(self.task_size, overlap)
        inclusion_split(*self.inclusion)


_TABLES = {"4.2-P1": dict(model="lenet5", tasks=2), "4.2-P2": dict(model="lenet5", tasks=2),
           "4.4-P1": dict(model="vgg", tasks=5, regroup_variant="simplified", n_calib=6000),
           "4.4-P2": dict(model="vgg", tasks=5, regroup_variant="simplified", n_calib=6000),
           "4.5-P2": dict(model="resnet", tasks=2)}

#: The full reproduction: tiled-mnist (56×56) with the protocol defaults of `ExperimentConfig`, 3 seeds;
#: VGG and ResNet at half width so that the whole plan takes hours, not days, on 2 CPU cores. In the
#: tables PAM chooses α per seed from ``TABLE_ALPHAS`` on calibration data (`choose_alpha`); the ablations
#: fix α and prune the regrouped network only (the sweeps study the regrouping; `compare_unshared`). Latency is
#: timed for the tables only; the ablations compare FLOPs and sharing.
TABLE_ALPHAS = [0.05, 0.1, 0.3]
FULL = ReproductionPlan(
    name="full", seeds=[0, 1, 2],
    common=dict(dataset="tiled-mnist", epochs=8, methods=["baseline1", "mtz", "pam"]),
    tables={k: dict(v, epochs=6, width=0.5, alpha=TABLE_ALPHAS) if v["model"] != "lenet5" else dict(v, alpha=TABLE_ALPHAS)
            for k, v in _TABLES.items()},
    ablation=dict(model="lenet5", tasks=2, pruner="taylor", methods=["baseline1", "pam"], latency=False,
                  compare_unshared=False),
    alphas=[0.05, 0.1, 0.3, 0.8], overlaps=[0, 2, 4, 5],
)

#: ``--quick``: 16×16 tiled-digits, fewer samples, epochs and pruning rounds, 2 seeds, fewer ablation points,
#: no latency timing (Sec. 4.6 compares FLOPs; the timing would add minutes to a 15-minute budget).
QUICK = ReproductionPlan(
    name="quick", seeds=[0, 1],
    common=dict(dataset="tiled-digits", n_train=1200, n_calib=1600, n_test=800, epochs=4, methods=["baseline1", "mtz", "pam"],
                finetune_epochs=1, prune_rounds=12, prune_finetune_steps=25, prune_step=0.15, importance_batches=4,
                tolerance=0.01, search_tolerance=0.02, vib_epochs=4, mtz_samples=200, mtz_finetune_steps=25,
                recover_candidates=1, recover_epochs=1, regroup_samples=200, latency=False),
    tables={k: dict(v, n_calib=1600, width=0.5) if v["model"] != "lenet5" else dict(v) for k, v in _TABLES.items()},
    ablation=dict(model="lenet5", tasks=2, pruner="taylor", methods=["baseline1", "pam"], compare_unshared=False),
    alphas=[0.05, 0.3, 0.8], overlaps=[0, 3, 5],
)


def _config_json(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _saved(target: Path, config: ExperimentConfig) -> Results | None:
    """The JSON record at ``target`` if it exists and was written for exactly ``config``, else None.
    A key added to `ExperimentConfig` after the record was written takes its default there, or its
    `SAVED_BEFORE_KEY` value where the new default changed what a run computes."""
    if not target.exists():
        return None
    saved = json.loads(target.read_text())
    written = {**_config_json(ExperimentConfig()), **SAVED_BEFORE_KEY, **saved["config"]}
    return saved if written == _config_json(config) else None


def saved_results(folder: Path, config: ExperimentConfig) -> Results | None:
    """The results ``folder`` holds for exactly ``config``, or None (no results.json, or another config's)."""
    return _saved(Path(folder) / "results.json", config)


def seed_file(folder: Path, seed: int) -> Path:
    """Where `run_seed_into` keeps one seed's results of the run in ``folder``."""
    return Path(folder) / "seeds" / f"seed-{seed}.json"


def saved_seed(folder: Path, config: ExperimentConfig, seed: int) -> Results | None:
    """Seed ``seed`` of ``config`` as ``folder`` holds it (``config``, ``results``: its `seed_results`,
    ``wall_seconds``), or None. The configurations compare with ``seeds`` set to that seed, so a run
    with more seeds reuses the ones it shares."""
    return _saved(seed_file(folder, seed), dataclasses.replace(config, seeds=[seed]))


def run_seed_into(folder: Path, config: ExperimentConfig, seed: int, *, force: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print, workers: int = 1) -> Results:
    """One seed of the comparison of ``config``, saved atomically as `seed_file` as soon as it ends (read
    back instead when ``folder`` already holds it, unless ``force``); the α trace of the config's first
    seed (Fig. 4.7) is written beside. A run cut off midway keeps its finished seeds. ``workers``: the
    seed's pruning runs at once (`run_seed`; the results do not depend on it)."""
    saved = None if force else saved_seed(folder, config, seed)
    if saved is not None:
        log(f"seed {seed}: read back from {seed_file(folder, seed)}")
        return saved
    config.validate()
    started = time.perf_counter()
    run = run_seed(config, seed, progress, log, workers=workers)
    record = {"config": _config_json(dataclasses.replace(config, seeds=[seed])),
              "results": seed_results(config, run), "wall_seconds": time.perf_counter() - started}
    if seed == config.seeds[0] and run.regrouping is not None:
        plot_alpha_trace(run.regrouping, Path(folder) / "alpha_trace.png")
    with atomic_path(seed_file(folder, seed)) as tmp:
        tmp.write_text(json.dumps(record))
    return record


def finish_run(folder: Path, config: ExperimentConfig, seeds: list[Results]) -> Results:
    """Assemble the results of ``config`` from its seeds' `run_seed_into` records and write its report
    (results.json, table.txt, plots) into ``folder``; ``wall_seconds`` is the sum over the seeds."""
    results = results_from_seeds(config, [s["results"] for s in seeds])
    results["wall_seconds"] = sum(s["wall_seconds"] for s in seeds)
    write_report(results, Path(folder))
    with atomic_path(Path(folder) / "table.txt") as tmp:
        tmp.write_text(format_table(results) + "\n")
    return results


def run_into(folder: Path, config: ExperimentConfig, *, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = print, workers: int = 1) -> Results:
    """The comparison of ``config`` with its report (results.json, table.txt, plots) in ``folder``.

    When ``folder`` already holds the results of the same configuration they are read back instead
    (``force`` reruns); so are the seeds of an interrupted run (`run_seed_into`, with ``workers``). Used
    by `reproduce` and by tools/bench_gain.py.
    """
    saved = None if force else saved_results(folder, config)
    if saved is not None:
        log(f"read back from {Path(folder) / 'results.json'}")
        return saved
    seeds = [run_seed_into(folder, config, seed, force=force, progress=progress, log=log, workers=workers)
             for seed in config.seeds]
    return finish_run(folder, config, seeds)


# ---------------------------------------------------------------------------------------------- numbers


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _pm(stat: Mapping[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _letters(results: Results) -> dict[str, str]:
    """Our task names → the paper's A, B, C, ... in task order."""
    return dict(zip(results["tasks"], LETTERS))


def _combo_label(tasks: list[str], letters: Mapping[str, str]) -> str:
    return "&".join(letters[t] for t in tasks)


def _mean_sharing(results: Results, stage: str) -> dict[str, float]:
    """Per seed, the sharing ratio of ``stage`` averaged over the layers; mean ± std over seeds."""
    return _stat([statistics.fmean(s["sharing_ratio"][stage].values()) for s in results["seeds"]])


def _paper_gains(rows: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]], baseline: int) -> dict[str, float]:
    """Average and peak gain of PAM over column ``baseline`` of a paper table, as Sec. 4.6.1 defines them."""
    ratios = [flops[baseline] / flops[2] for _, flops in rows.values()]
    return {"average": statistics.fmean(ratios), "peak": max(ratios)}


def _same_networks(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    """Whether two configurations train and prune the same single-task networks, whatever their α, methods,
    unshared candidate, handling of independent components (one network has one) and latency timing."""
    def networks(c: ExperimentConfig) -> ExperimentConfig:
        return dataclasses.replace(c, alpha=0.0, methods=["pam"], latency=False, compare_unshared=False,
                                   component_selection=False, component_rounds=False)
    return networks(a) == networks(b)


def _gains_over(ours: Results, base: Results, baseline: str = "baseline1") -> dict[str, dict[str, float]]:
    """PAM's average and peak gain over ``baseline``, per seed (Sec. 4.6.1), then mean ± std; ``base``
    holds the baseline's runs on the same seeds (it may be ``ours``)."""
    per_seed = []
    for mine, theirs in zip(ours["seeds"], base["seeds"]):
        ratios = [b["flops"][baseline] / m["flops"]["pam"] for m, b in zip(mine["combinations"], theirs["combinations"])]
        per_seed.append((statistics.fmean(ratios), max(ratios)))
    return {"average": _stat([a for a, _ in per_seed]), "peak": _stat([p for _, p in per_seed])}


def label_relatedness(dataset: str, seed: int, labels: Mapping[str, list[int]], n_train: int) -> float:
    """I(Y^A; Y^B) in bits between the two tasks' label vectors on the training split, as Sec. 4.6.3.2
    measures relatedness: each task's binary label vector is one discrete variable, and the estimate
    is the plug-in one of `sklearn.metrics.mutual_info_score` (biased upward on few samples)."""
    try:
        from sklearn.metrics import mutual_info_score
    except ImportError as exc:
        raise ImportError("scikit-learn is needed for the relatedness study: pip install 'pamfx[data]'") from exc
    train = load_dataset(dataset, seed=seed, n_train=n_train, n_calib=1, n_test=1).train.labels.numpy().astype(np.int64)
    codes = [train[:, idx] @ (1 << np.arange(len(idx))) for idx in labels.values()]
    return float(mutual_info_score(*codes) / np.log(2))


# ---------------------------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _bars(ax: Any, series: Mapping[str, list[dict[str, float]]], labels: list[str]) -> None:
    """Grouped bars of mean ± std, one group per label."""
    width = 0.8 / max(len(series), 1)
    for k, (name, stats) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], [s["mean"] for s in stats], width,
               yerr=[s["std"] for s in stats], capsize=2, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=45, ha="right",
                  fontsize=7)


def plot_gains(tables: Mapping[str, Results], path: Path) -> Path:
    """Fig. 4.5: average and peak gain of PAM over baseline 1 (top) and baseline 2 (bottom) per setting,
    mean ± std over seeds; the shaded band is the range of the paper's average gains."""
    baselines = [b for b in ("baseline1", "mtz") if any(b in r["summary"]["gain"] for r in tables.values())]
    fig, axes = plt.subplots(len(baselines), 1, figsize=(7, 3.2 * len(baselines)), squeeze=False)
    for ax, base in zip(axes[:, 0], baselines):
        names = [n for n, r in tables.items() if base in r["summary"]["gain"]]
        series = {kind: [tables[n]["summary"]["gain"][base][kind] for n in names] for kind in ("average", "peak")}
        _bars(ax, series, names)
        ax.axhspan(*PAPER_GAINS[base]["average"], color="grey", alpha=0.2, label="paper: average gains")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"gain over {METHOD_COLUMNS[base]} (×)")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 4.5 analogue: PAM's gains (FLOPs ratio)")
    return _save(fig, path)


def plot_sharing_layers(tables: Mapping[str, Results], path: Path) -> Path:
    """Fig. 4.6: per setting, the sharing ratio of every layer after merging and after pruning (mean ± std)."""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.4 * len(tables), 3.2), squeeze=False)
    for ax, (name, results) in zip(axes[0], tables.items()):
        layers = list(results["seeds"][0]["sharing_ratio"]["pruned"])
        series = {stage: [_stat([100 * s["sharing_ratio"][stage][layer] for s in results["seeds"]]) for layer in layers]
                  for stage in ("merged", "pruned")}
        _bars(ax, series, layers)
        ax.set_ylim(0, 105)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("shared by all tasks (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fig. 4.6 analogue: sharing ratio per layer")
    return _save(fig, path)


def _line(ax: Any, x: list[float], stats: list[dict[str, float]], label: str) -> None:
    ax.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=2, label=label)


def plot_sweep(sweep: Mapping[float, Results], path: Path) -> Path:
    """Sec. 4.6.3.1: PAM's FLOPs of every combination (left) and its sharing ratio (right) against α."""
    alphas = list(sweep)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    first = next(iter(sweep.values()))
    letters = _letters(first)
    for i, combo in enumerate(first["summary"]["combinations"]):
        _line(left, alphas, [{k: v / 1e6 for k, v in sweep[a]["summary"]["combinations"][i]["flops"]["pam"].items()}
                             for a in alphas], _combo_label(combo["tasks"], letters))
    left.set_xlabel("α (relative)")
    left.set_ylabel("MFLOPs after pruning")
    left.legend(fontsize=7)
    for stage in ("merged", "pruned"):
        _line(right, alphas, [{k: 100 * v for k, v in _mean_sharing(sweep[a], stage).items()} for a in alphas], stage)
    right.set_xlabel("α (relative)")
    right.set_ylabel("mean sharing ratio over layers (%)")
    right.legend(fontsize=7)
    fig.suptitle("Sec. 4.6.3.1 analogue: α trades single-task cost against joint cost")
    return _save(fig, path)


def plot_relatedness(study: Mapping[int, Results], bits: Mapping[int, float], path: Path) -> Path:
    """Sec. 4.6.3.2: sharing ratio (left) and PAM's gain over baseline 1 (right) against label overlap."""
    overlaps = list(study)
    ticks = [f"{o}\n{bits[o]:.2f} bit" for o in overlaps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for stage in ("merged", "pruned"):
        _line(left, overlaps, [{k: 100 * v for k, v in _mean_sharing(study[o], stage).items()} for o in overlaps], stage)
    left.set_ylabel("mean sharing ratio over layers (%)")
    for kind in ("average", "peak"):
        _line(right, overlaps, [study[o]["summary"]["gain"]["baseline1"][kind] for o in overlaps], kind)
    right.set_ylabel("gain over B1 (×)")
    for ax in (left, right):
        ax.set_xticks(overlaps, ticks, fontsize=7)
        ax.set_xlabel("shared labels / I(Y^A; Y^B)")
        ax.legend(fontsize=7)
    fig.suptitle("Sec. 4.6.3.2 analogue: task relatedness")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- document


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _gain_text(gain: Mapping[str, Mapping[str, float]]) -> str:
    return f"average {_pm(gain['average'])}×, peak {_pm(gain['peak'])}×"


def _table_section(table: str, settings: Mapping[str, Results]) -> list[str]:
    lines = [f"## {TABLE_TITLES[table]}", ""]
    paper = PAPER_TABLES.get(table, {})
    if not paper:
        lines += ["The paper's numbers for this table are not in its text; its gain ranges (Fig. 4.5) apply.", ""]
    for setting, results in settings.items():
        pruner = setting.split("-")[1]
        methods = [m for m in METHOD_COLUMNS if m in results["summary"]["combinations"][0]["flops"]]
        letters = _letters(results)
        rows_paper = paper.get(pruner, {})
        header = (["tasks"] + [f"acc {METHOD_COLUMNS[m]} (%)" for m in methods] + [f"MFLOPs {METHOD_COLUMNS[m]}" for m in methods]
                  + (["paper acc B1 / B2 / PAM (%)", "paper MFLOPs B1 / B2 / PAM"] if rows_paper else []))
        rows = []
        for combo in results["summary"]["combinations"]:
            label = _combo_label(combo["tasks"], letters)
            row = ([label] + [_pm(combo["accuracy"][m], 100) for m in methods]
                   + [_pm(combo["flops"][m], 1e-6, 3) for m in methods])
            if rows_paper:
                acc, flops = rows_paper.get(label, (None, None))
                row += [" / ".join(f"{v:.2f}" for v in acc) if acc else "—",
                        " / ".join(f"{v:.2f}" for v in flops) if flops else "—"]
            rows.append(row)
        tasks = ", ".join(f"{letters[t]} = {t}" for t in results["tasks"])
        config = results["config"]
        lines += [f"### {pruner} ({config['pruner']}), {config['model']} (width {config['width']:g}) on {config['dataset']}, "
                  f"{len(results['seeds'])} seeds",
                  "", f"Tasks: {tasks}. Our numbers are mean ± std over the seeds; accuracy is the mean binary "
                  "accuracy over the combination's labels on the test split.", ""]
        lines += _md(header, rows)
        for base, gain in results["summary"]["gain"].items():
            line = f"- PAM over {METHOD_COLUMNS[base]}: {_gain_text(gain)}"
            if len(rows_paper) == len(results["summary"]["combinations"]):
                ours_paper = _paper_gains(rows_paper, list(METHOD_COLUMNS).index(base))
                line += f" (paper, from its table: average {ours_paper['average']:.2f}×, peak {ours_paper['peak']:.2f}×)"
            lines.append(line)
        unmatched = [METHOD_COLUMNS[m] for m, ok in results["summary"]["matched"].items() if not ok]
        if unmatched:
            lines.append(f"- Not at matched accuracy on some seed (least-deficient checkpoint reported): {', '.join(unmatched)}")
        lines += [f"- Details: [{setting}/table.txt]({setting}/table.txt), [{setting}/results.json]({setting}/results.json)",
                  ""]
    return lines


def _gains_section(tables: Mapping[str, Results]) -> list[str]:
    rows = []
    for name, results in tables.items():
        gains = results["summary"]["gain"]
        rows.append([name] + [_pm(gains[b][k]) if b in gains else "—" for b in ("baseline1", "mtz") for k in ("average", "peak")])
    paper = [f"{lo:.2f}–{hi:.2f}" for b in ("baseline1", "mtz") for lo, hi in PAPER_GAINS[b].values()]
    rows.append(["paper (range over its settings)"] + paper)
    lines = [f"## {SECTION_TITLES['gains']}", "",
             "Gain = FLOPs of the baseline / FLOPs of PAM per task combination; average and peak over the "
             "combinations (Sec. 4.6.1), per seed, then mean ± std over the seeds.", ""]
    lines += _md(["setting", "avg over B1", "peak over B1", "avg over B2", "peak over B2"], rows)
    lines += ["![Fig. 4.5 analogue](fig4_5_gains.png)", ""]
    for base in ("baseline1", "mtz"):
        averages = [r["summary"]["gain"][base]["average"]["mean"] for r in tables.values() if base in r["summary"]["gain"]]
        if averages:
            low = PAPER_GAINS[base]["average"][0]
            held = sum(a >= low for a in averages)
            lines.append(f"- Average gain over {METHOD_COLUMNS[base]} at or above the paper's lowest ({low:.2f}×): "
                         f"{held} of {len(averages)} settings (ours: {min(averages):.2f}–{max(averages):.2f}×).")
    return lines + [""]


def _sharing_section(tables: Mapping[str, Results]) -> list[str]:
    rows = [[name, _pm(_mean_sharing(r, "merged"), 100, 1), _pm(_mean_sharing(r, "pruned"), 100, 1),
             _pm(r["summary"]["gain"]["baseline1"]["average"]) if "baseline1" in r["summary"]["gain"] else "—",
             _pm(r["summary"]["gain"]["mtz"]["average"]) if "mtz" in r["summary"]["gain"] else "—"]
            for name, r in tables.items()]
    lines = [f"## {SECTION_TITLES['sharing']}", "",
             "Share of a layer's channels used by every task (PAM), after merging and after pruning; the "
             "paper expects more sharing to go with more gain over B1 and less gain over B2.", ""]
    lines += _md(["setting", "mean sharing merged (%)", "mean sharing pruned (%)", "avg gain over B1", "avg gain over B2"], rows)
    return lines + ["![Fig. 4.6 analogue](fig4_6_sharing.png)", ""]


def _trace_section(tables: Mapping[str, Results]) -> list[str]:
    lines = [f"## {SECTION_TITLES['trace']}", "",
             "I(L'^A; Y^B) and I(L'^B; Y^A) against the greedy's iterations (Alg. 4), per layer, first seed, "
             "up to the α the run used (dotted).", ""]
    for name in tables:
        if tables[name]["config"]["tasks"] == 2:
            lines += [f"![α trace, {name}]({name}/alpha_trace.png)", ""]
            break
    return lines


def _has_baseline1(results: Results) -> bool:
    return "baseline1" in results["summary"]["combinations"][0]["flops"]


def _sweep_section(sweep: Mapping[float, Results], baseline: Results | None, alpha: float) -> list[str]:
    first = next(iter(sweep.values()))
    letters = _letters(first)
    combos = [_combo_label(c["tasks"], letters) for c in first["summary"]["combinations"]]
    rows = [[f"{alpha:g}", _pm(_mean_sharing(r, "merged"), 100, 1), _pm(_mean_sharing(r, "pruned"), 100, 1)]
            + [_pm(c["flops"]["pam"], 1e-6, 3) for c in r["summary"]["combinations"]]
            + [_pm(_gains_over(r, baseline or r)["average"]) if _has_baseline1(baseline or r) else "—"]
            for alpha, r in sweep.items()]
    merged = [_mean_sharing(r, "merged")["mean"] for r in sweep.values()]
    falls = all(a >= b for a, b in zip(merged, merged[1:]))
    lines = [f"## {SECTION_TITLES['sweep']}", "",
             f"PAM with the ablation setting ({first['config']['model']}, {first['config']['pruner']}) for each α, its "
             "network selected on the calibration split like every other run. The paper: a larger α gives each task "
             "more exclusive channels (cheaper single tasks) and fewer shared ones (dearer joint execution). Here the "
             "sharing ratio after merging goes " + " → ".join(f"{100 * m:.1f}%" for m in merged)
             + (", falling with α as the paper expects." if falls else ": it does not fall monotonically with α.")
             + " The table runs choose α per seed from their candidates on the calibration split and the other "
             f"ablations use α = {alpha:g}; no α is chosen from this sweep.", ""]
    lines += _md(["α", "sharing merged (%)", "sharing pruned (%)"] + [f"MFLOPs {c}" for c in combos] + ["avg gain over B1"],
                 rows)
    reference = baseline or first
    if _has_baseline1(reference):
        b1 = [_pm(c["flops"]["baseline1"], 1e-6, 3) for c in reference["summary"]["combinations"]]
        source = f"the {SWEEP_BASELINE} run" if baseline is not None else "each run"
        lines += [f"Baseline 1 of the same networks ({source}): "
                  + ", ".join(f"{c} {v}" for c, v in zip(combos, b1)) + " MFLOPs.", ""]
    else:
        lines += [f"Baseline 1 of the same networks comes from the {SWEEP_BASELINE} run, which has not run yet.", ""]
    return lines + ["![α sweep](sec4_6_3_1_alpha_sweep.png)", ""]


def _relatedness_section(study: Mapping[int, Results], bits: Mapping[int, float]) -> list[str]:
    rows = [[str(o), f"{bits[o]:.3f}", ", ".join(r["tasks"]), _pm(_mean_sharing(r, "merged"), 100, 1),
             _pm(_mean_sharing(r, "pruned"), 100, 1), _gain_text(r["summary"]["gain"]["baseline1"])]
            for o, r in study.items()]
    lines = [f"## {SECTION_TITLES['relatedness']}", "",
             "Two tasks of the same number of labels sharing more and more of them (`pamfx.data.overlap_split`); "
             "relatedness is I(Y^A; Y^B) on the training labels (first seed). The paper: more related tasks "
             "share more neurons.", ""]
    lines += _md(["shared labels", "I(Y^A; Y^B) (bits)", "tasks", "sharing merged (%)", "sharing pruned (%)",
                  "gain over B1"], rows)
    order = sorted(study, key=lambda o: bits[o])
    for stage in ("merged", "pruned"):
        values = [_mean_sharing(study[o], stage)["mean"] for o in order]
        verdict = "rises" if all(a <= b for a, b in zip(values, values[1:])) else "does not rise monotonically"
        lines.append(f"- Sharing ratio {stage} {verdict} with relatedness: "
                     + " → ".join(f"{100 * v:.1f}%" for v in values))
    gains = [study[o]["summary"]["gain"]["baseline1"]["average"]["mean"] for o in order]
    lines.append("- Average gain over B1 with relatedness: " + " → ".join(f"{g:.2f}×" for g in gains))
    return lines + ["", "![relatedness](sec4_6_3_2_relatedness.png)", ""]


def _inclusion_section(results: Results) -> list[str]:
    a, b = results["tasks"]
    lines = [f"## {SECTION_TITLES['inclusion']}", "",
             f"Task B = {b} has a subset of the labels of task A = {a} (`pamfx.data.inclusion_split`). "
             "The paper expects almost no B-exclusive neurons. Channels per group (mean ± std over seeds):", ""]
    rows, totals = [], {"merged": [0.0, 0.0], "pruned": [0.0, 0.0]}
    for layer in results["seeds"][0]["group_sizes"]["merged"]:
        row = [layer]
        for stage in ("merged", "pruned"):
            sizes = [s["group_sizes"][stage][layer] for s in results["seeds"]]
            for label in (a, b, f"{a}&{b}"):
                row.append(_pm(_stat([float(g.get(label, 0)) for g in sizes]), digits=1))
            totals[stage][0] += statistics.fmean(g.get(b, 0) for g in sizes)
            totals[stage][1] += statistics.fmean(sum(g.values()) for g in sizes)
        rows.append(row)
    lines += _md(["layer"] + [f"{stage}: {g}" for stage in ("merged", "pruned") for g in ("A only", "B only", "shared")],
                 rows)
    for stage, (only_b, total) in totals.items():
        lines.append(f"- B-exclusive channels {stage}: {only_b:.1f} of {total:.1f} ({100 * only_b / max(total, 1):.1f}%).")
    return lines + [f"- PAM over B1: {_gain_text(results['summary']['gain']['baseline1'])}", ""]


def _header(plan: ReproductionPlan, command: str, walls: Mapping[str, float], total: float,
            missing: Mapping[str, list[int]]) -> list[str]:
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    lines = ["# Reproduction of Sec. 4.6 (Pruning-Aware Merging)", "",
             f"Written by `{command}` (plan `{plan.name}`, seeds {plan.seeds}) in {total / 60:.1f} min on {machine}; "
             f"the runs took {sum(walls.values()) / 3600:.1f} h together (wall time of each run below).", "",
             "Protocol: every method (B1: each single-task network pruned on its own; B2: MTZ merge; PAM) is "
             "fine-tuned alike and pruned by the same pruner; each method's network is its cheapest checkpoint "
             "whose every task keeps its calibration accuracy within the tolerance of the unpruned single-task "
             "network; only that checkpoint is evaluated on the test split. PAM's α is chosen per seed on the "
             "calibration split from the plan's candidates (the table runs) or fixed by the plan (the ablations); "
             "in the table runs PAM also prunes the unshared merge and keeps the cheaper on calibration; "
             "the tolerance is fixed; nothing is chosen on test data. FLOPs are 2 × multiply-accumulates of conv and "
             "linear layers per sample. The data are tiled digits (four digits per image, one binary label per "
             "digit class), the models small LeNet-5 / VGG / ResNet-style networks, so absolute FLOPs and "
             "accuracies differ from the paper's; the gains (ratios) are what compare.", ""]
    lines += _md(["run", "wall time (min)"], [[n, f"{s / 60:.1f}"] for n, s in walls.items()])
    if missing:
        lines += [f"**Partial: {len(missing)} of {len(walls) + len(missing)} runs have not finished** "
                  f"({', '.join(_with_seeds(name, seeds) for name, seeds in missing.items())}); their sections "
                  "say so. `pamfx reproduce --out` on this folder runs them and reads the finished runs and seeds "
                  "back.", ""]
    return lines


def _with_seeds(name: str, seeds: list[int]) -> str:
    return f"{name} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} saved)" if seeds else name


def _pending(title: str, names: list[str]) -> list[str]:
    """A section whose runs have not finished (``reproduce(..., report_only=True)``)."""
    return [f"## {title}", "", f"Not run yet: {', '.join(names)}.", ""]


def _seed_job(folder: Path, config: ExperimentConfig, seed: int, force: bool, name: str, threads: int,
              workers: int) -> Results:
    """One seed of a run in a worker process of `reproduce` (``jobs > 1``): no progress bars, lines
    prefixed by the run."""
    torch.set_num_threads(threads)
    return run_seed_into(folder, config, seed, force=force, progress=False,
                         log=lambda line: print(f"{name}: {line}", flush=True), workers=workers)


def _spread(configs: Mapping[str, ExperimentConfig]) -> list[str]:
    """The runs in an order that keeps runs training the same single-task networks apart (round robin
    over the networks), so that parallel workers fill the shared cache instead of training twice."""
    groups: dict[tuple, list[str]] = {}
    for name, c in configs.items():
        key = (c.dataset, c.model, c.width, c.tasks, c.epochs, json.dumps(c.labels, sort_keys=True))
        groups.setdefault(key, []).append(name)
    queues = list(groups.values())
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


def reproduce(out: str | Path, plan: ReproductionPlan = FULL, *, force: bool = False, progress: bool = True,
              log: Callable[[str], None] = print, command: str = "pamfx reproduce", jobs: int = 1,
              report_only: bool = False, workers: int = 1) -> Path:
    """Run every section of ``plan`` and write ``out/REPRODUCTION.md`` with its plots; returns its path.

    ``jobs > 1`` runs that many seeds at once in worker processes (each with this process's torch thread
    count, no progress bars): the seeds of every run are independent, so the document is the same, and
    a long run's seeds run side by side. ``workers``: each seed's pruning runs at once (`run_seed`), in
    every job. ``report_only``
    runs nothing: the document is written from the runs ``out`` already holds, and the sections of the
    others say that they have not run yet.
    """
    if jobs < 1 or workers < 1:
        raise InputError(f"jobs and workers must be >= 1, got {jobs} and {workers}")
    plan.validate()
    out = Path(out)
    started = time.perf_counter()
    configs: dict[str, ExperimentConfig] = {setting: plan.table_config(setting) for setting in plan.tables}
    same = SWEEP_BASELINE in plan.tables and _same_networks(plan.table_config(SWEEP_BASELINE), plan.ablation_config())
    methods = ["pam"] if same else ["baseline1", "pam"]
    sweep_runs = {alpha: f"alpha-{alpha:g}" for alpha in plan.alphas}
    study_runs = {o: f"overlap-{o}" for o in plan.overlaps}
    configs.update({name: plan.ablation_config(alpha=alpha, methods=methods) for alpha, name in sweep_runs.items()})
    splits = {o: overlap_split(plan.task_size, o) for o in plan.overlaps}
    labelled = {study_runs[o]: labels for o, labels in splits.items()}
    labelled["inclusion"] = inclusion_split(*plan.inclusion)
    configs.update({name: dataclasses.replace(plan.ablation_config(), labels={t: list(v) for t, v in labels.items()})
                    for name, labels in labelled.items()})

    results: dict[str, Results] = {}
    if report_only:
        results = {name: r for name, config in configs.items() if (r := saved_results(out / name, config)) is not None}
    elif jobs == 1:
        for name, config in configs.items():
            results[name] = run_into(out / name, config, force=force, progress=progress,
                                     log=lambda line, name=name: log(f"{name}: {line}"), workers=workers)
    else:
        for name, config in configs.items():
            if not force and (saved := saved_results(out / name, config)) is not None:
                results[name] = saved
                log(f"{name}: read back from {out / name / 'results.json'}")
        todo = {name: config for name, config in configs.items() if name not in results}
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
            futures = {(name, seed): pool.submit(_seed_job, out / name, todo[name], seed, force, name,
                                                 torch.get_num_threads(), workers)
                       for name in _spread(todo) for seed in todo[name].seeds}
            for name, config in todo.items():
                results[name] = finish_run(out / name, config, [futures[name, seed].result() for seed in config.seeds])
                log(f"{name}: done")
    results = {name: results[name] for name in configs if name in results}
    missing = {name: [seed for seed in configs[name].seeds if saved_seed(out / name, configs[name], seed) is not None]
               for name in configs if name not in results}
    tables = {setting: results[setting] for setting in plan.tables if setting in results}
    baseline = tables.get(SWEEP_BASELINE) if same else None
    sweep = {alpha: results[name] for alpha, name in sweep_runs.items() if name in results}
    study = {o: results[name] for o, name in study_runs.items() if name in results}
    common = plan.ablation_config()
    bits = {o: label_relatedness(common.dataset, plan.seeds[0], splits[o], common.n_train) for o in study}

    walls = {name: r["wall_seconds"] for name, r in results.items()}
    lines = _header(plan, command, walls, time.perf_counter() - started, missing)
    for table in TABLE_TITLES:
        settings = {s: r for s, r in tables.items() if s.startswith(table)}
        pending = [_with_seeds(s, missing[s]) for s in plan.tables if s.startswith(table) and s in missing]
        lines += _table_section(table, settings) if settings else _pending(TABLE_TITLES[table], pending)
    if tables:
        plot_gains(tables, out / "fig4_5_gains.png")
        plot_sharing_layers(tables, out / "fig4_6_sharing.png")
        lines += _gains_section(tables) + _sharing_section(tables) + _trace_section(tables)
    else:
        lines += [line for key in ("gains", "sharing", "trace") for line in _pending(SECTION_TITLES[key], list(plan.tables))]
    if sweep:
        plot_sweep(sweep, out / "sec4_6_3_1_alpha_sweep.png")
        lines += _sweep_section(sweep, baseline, common.alpha)
    else:
        lines += _pending(SECTION_TITLES["sweep"], list(sweep_runs.values()))
    if study:
        plot_relatedness(study, bits, out / "sec4_6_3_2_relatedness.png")
        lines += _relatedness_section(study, bits)
    else:
        lines += _pending(SECTION_TITLES["relatedness"], list(study_runs.values()))
    lines += _inclusion_section(results["inclusion"]) if "inclusion" in results else _pending(SECTION_TITLES["inclusion"], ["inclusion"])
    target = out / "REPRODUCTION.md"
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines))
    return target
