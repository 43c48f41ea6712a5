"""Latency of PAM's emitted modules against baseline 1's networks, for the gain benchmark's settings.

    python tools/bench_latency.py                            # every setting of tools/bench_gain.py, seed 0
    python tools/bench_latency.py demo lenet5-5tasks-p2      # some settings
    python tools/bench_latency.py --seeds 0 1 2 --quick      # other seeds; fewer timed repeats

A setting is ``demo`` or the name of a TOML file in configs/ (as in tools/bench_gain.py). For each
setting and seed the comparison runs with latency on (`pamfx.latency`: eager torch with 1 thread
and onnxruntime with 1 intra-op thread, batch 8 and batch 1, interleaved medians after warm-up),
and the selected networks of every method are saved with `pamfx.save` under
``--out``/<setting>/networks/. A later run of the same configuration loads those networks and
only times them again (pruning a setting takes 5-15 min a seed on 2 loaded cores; timing, seconds
to a minute), so the figures follow the emitted code as it changes; ``--force`` prunes again.
Results (results.json, table.txt, plots including latency.png) go to ``--out``/<setting>/.

Printed per setting and combination (mean ± std over the seeds): the FLOP gain of PAM over
baseline 1 (FLOPs B1 / FLOPs PAM), the latency gain (t B1 / t PAM) in torch and onnxruntime at
batch 8 and batch 1, PAM's time at batch 8 and 1 in torch, and latency gain / FLOP gain at batch
8 (the target is >= 0.85 for every combination); then per setting the median and worst ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pamfx  # noqa: E402
from bench_gain import SETTINGS, config_of  # noqa: E402
from pamfx.atomic import atomic_path  # noqa: E402
from pamfx.experiment import ExperimentConfig, results_dict, run_comparison  # noqa: E402
from pamfx.frontend import example_from_meta  # noqa: E402
from pamfx.latency import Networks, measure_latency, seed_latency, summarise_latency  # noqa: E402
from pamfx.report import format_table, write_report  # noqa: E402

TARGET = 0.85
BACKENDS = ("torch", "onnxruntime")
TIMING_KEYS = {"latency", "latency_backends", "latency_repeats", "latency_clock"}  # changing these re-times, never re-prunes


def _network_paths(folder: Path, seed: int, method: str, tasks: list[str]) -> dict[str | None, Path]:
    """Where a method's selected network(s) of one seed are saved: one file, or one per task for baseline 1."""
    base = folder / "networks" / f"seed{seed}"
    if method == "baseline1":
        return {task: base / method / f"{i}.pt" for i, task in enumerate(tasks)}
    return {None: base / f"{method}.pt"}


def _same_pipeline(saved: dict, config: ExperimentConfig) -> bool:
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    return {k: v for k, v in saved.items() if k not in TIMING_KEYS} == {k: v for k, v in now.items() if k not in TIMING_KEYS}


def _load_networks(folder: Path, results: dict) -> list[Networks] | None:
    """Every seed's saved networks, or None where any file is missing."""
    out = []
    for run in results["seeds"]:
        networks = {}
        for method in results["config"]["methods"]:
            paths = _network_paths(folder, run["seed"], method, results["tasks"])
            if not all(p.is_file() for p in paths.values()):
                return None
            loaded = {task: pamfx.load(p) for task, p in paths.items()}
            networks[method] = loaded[None] if None in loaded else loaded
        out.append(networks)
    return out


def run_setting(setting: str, args: argparse.Namespace) -> dict:
    """The setting's results with freshly measured latency: re-timed from saved networks where possible."""
    config = dataclasses.replace(config_of(setting), latency=True, latency_batches=[8, 1],
                                 latency_backends=list(BACKENDS), latency_repeats=args.repeats,
                                 latency_clock=args.clock)
    if args.seeds:
        config = dataclasses.replace(config, seeds=list(args.seeds))
    config.validate()
    folder = args.out / setting
    target = folder / "results.json"

    def log(line: str) -> None:
        print(f"{setting}: {line}", flush=True)

    started = time.perf_counter()
    saved = json.loads(target.read_text()) if target.exists() and not args.force else None
    networks = _load_networks(folder, saved) if saved and _same_pipeline(saved["config"], config) else None
    if networks is not None:
        log(f"re-timing the networks saved in {folder / 'networks'}")
        tasks = pamfx.TaskSpace(tuple(saved["tasks"]))
        latencies = [measure_latency(nets, tasks, example_from_meta(nets["pam"]), batches=config.latency_batches,
                                     backends=config.latency_backends, repeats=config.latency_repeats,
                                     clock=config.latency_clock, seed=run["seed"],
                                     progress=not args.no_progress)
                     for nets, run in zip(networks, saved["seeds"])]
        for run, latency in zip(saved["seeds"], latencies):
            seed_latency(run, latency, tasks)
        results = summarise_latency(saved)
        results["config"] = json.loads(json.dumps(dataclasses.asdict(config)))
    else:
        runs = run_comparison(config, progress=not args.no_progress, log=log)
        results = results_dict(config, runs)
        results["wall_seconds"] = time.perf_counter() - started
        for run in runs:
            for method, result in run.methods.items():
                network = result.network
                for task, path in _network_paths(folder, run.seed, method, list(run.tasks)).items():
                    pamfx.save(network if task is None else network[task], path)
    log(f"{time.perf_counter() - started:.0f} s")
    write_report(results, folder)
    with atomic_path(folder / "table.txt") as tmp:
        tmp.write_text(format_table(results) + "\n")
    return results


def _pm(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}±{statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summary_table(setting: str, results: dict) -> list[str]:
    """One row per combination of one setting (and method compared), then the ratio's median and worst."""
    lines = []
    for base in [m for m in results["config"]["methods"] if m != "pam"]:
        ratios: dict[str, list[float]] = {b: [] for b in BACKENDS}
        for i, combo in enumerate(results["summary"]["combinations"]):
            per_seed = [run["combinations"][i] for run in results["seeds"]]
            flop_gain = [c["flops"][base] / c["flops"]["pam"] for c in per_seed]
            gain = {(b, n): [c["latency_gain"][base][b][n] for c in per_seed] for b in BACKENDS for n in ("8", "1")}
            ratio = {b: [g / f for g, f in zip(gain[b, "8"], flop_gain)] for b in BACKENDS}
            for b in BACKENDS:
                ratios[b].append(statistics.fmean(ratio[b]))
            pam_ms = {n: 1e3 * combo["latency"]["pam"]["torch"][n]["mean"] for n in ("8", "1")}
            lines.append(f"{setting[:18]:18s} {base[:9]:9s} {'&'.join(combo['tasks'])[:28]:28s} {_pm(flop_gain):>10s} "
                         + " ".join(f"{_pm(gain[b, n]):>10s}" for n in ("8", "1") for b in BACKENDS)
                         + f" {pam_ms['8']:8.3f} {pam_ms['1']:8.3f} "
                         + " ".join(f"{_pm(ratio[b]):>10s}" for b in BACKENDS))
        for b in BACKENDS:
            worst = min(range(len(ratios[b])), key=ratios[b].__getitem__)
            met = sum(r >= TARGET for r in ratios[b])
            lines.append(f"{setting[:18]:18s} {base[:9]:9s} {b}: latency gain / FLOP gain at batch 8: median "
                         f"{statistics.median(ratios[b]):.2f}, worst {ratios[b][worst]:.2f} "
                         f"({'&'.join(results['summary']['combinations'][worst]['tasks'])}); "
                         f">= {TARGET} for {met} of {len(ratios[b])} combinations")
    return lines


HEADER = [
    f"{'setting':18s} {'vs':9s} {'tasks':28s} {'FLOP gain':>10s} {'torch b8':>10s} {'ort b8':>10s} {'torch b1':>10s} "
    f"{'ort b1':>10s} {'PAM ms b8':>8s} {'ms b1':>8s} {'ratio t b8':>10s} {'ratio o b8':>10s}",
    "gains are t_B1 / t_PAM (latency) and FLOPs_B1 / FLOPs_PAM; ratio = latency gain / FLOP gain; "
    "PAM ms = its torch time per forward of the batch",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=SETTINGS, help=f"any of {SETTINGS}")
    parser.add_argument("--seeds", type=int, nargs="+", help="override every setting's seeds (default: 0)")
    parser.add_argument("--quick", action="store_true", help="fewer timed repeats (10 instead of 40)")
    parser.add_argument("--repeats", type=int, help="timed repeats per module (default 40, 10 with --quick)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="the timing thread's CPU time (default: robust on a shared machine) or wall time")
    parser.add_argument("--out", type=Path, default=Path("bench-latency-out"))
    parser.add_argument("--force", action="store_true", help="prune again even where networks are saved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for pruning (timing always uses 1)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {SETTINGS}")
    args.seeds = args.seeds or [0]
    args.repeats = args.repeats or (10 if args.quick else 40)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; timing: 1 thread, "
          f"median of {args.repeats} interleaved repeats after warm-up, clock {args.clock!r}, seeds {args.seeds}", flush=True)
    tables = []
    for setting in args.settings:
        results = run_setting(setting, args)
        tables += summary_table(setting, results)
        print(format_table(results), "", *HEADER, *summary_table(setting, results), sep="\n", flush=True)
    print()
    print("\n".join(HEADER + tables))


if __name__ == "__main__":
    main()
