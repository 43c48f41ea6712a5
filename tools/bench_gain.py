"""Gain of PAM over baseline 1 at matched accuracy, for the settings shipped in configs/, over seeds.

    python tools/bench_gain.py                          # every setting, the seeds of its config (3)
    python tools/bench_gain.py demo lenet5-2tasks-p2    # some settings
    python tools/bench_gain.py --seeds 0 1 2 3 4        # other seeds

A setting is ``demo`` (the built-in demo) or the name of a TOML file in configs/. Each setting's
results go to ``--out``/<setting>/ (results.json, table, plots) as soon as it finishes; a setting
whose results.json exists there with the same config is read back instead of rerun (``--force``
reruns it). The last lines print one table: per setting, the FLOPs of every combination for B1
and PAM and PAM's test accuracy minus B1's (mean ± std over the seeds), and the average and peak
gain (mean ± std).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path

import torch

from pamfx.cli import default_workers, load_config
from pamfx.experiment import ExperimentConfig
from pamfx.report import format_table
from pamfx.reproduce import run_into

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["demo", "lenet5-2tasks-p2", "lenet5-2tasks-overlap3-p2", "lenet5-2tasks-p1", "lenet5-5tasks-p2",
            "lenet5-5tasks-p1", "vgg-2tasks-p2"]


def config_of(setting: str) -> ExperimentConfig:
    if setting == "demo":
        return ExperimentConfig()
    return load_config(ROOT / "configs" / f"{setting}.toml")


def run_setting(setting: str, seeds: list[int] | None, out: Path, force: bool, progress: bool, workers: int) -> dict:
    config = config_of(setting)
    if seeds:
        config = dataclasses.replace(config, seeds=seeds)
    results = run_into(out / setting, config, force=force, progress=progress,
                       log=lambda line: print(f"{setting}: {line}", flush=True), workers=workers)
    print(format_table(results), flush=True)
    return results


def _pm(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{stat['mean'] * scale:.{digits}f}±{stat['std'] * scale:.{digits}f}"


def summary_table(results: dict[str, dict]) -> str:
    lines = [f"{'setting':18s} {'tasks':24s} {'MFLOPs B1':>14s} {'MFLOPs PAM':>14s} {'PAM/B1':>7s}"]
    for setting, r in results.items():
        s = r["summary"]
        for combo in s["combinations"]:
            if len(combo["tasks"]) not in (1, len(r["tasks"])):
                continue
            b1, pam = combo["flops"]["baseline1"], combo["flops"]["pam"]
            lines.append(f"{setting:18s} {'&'.join(combo['tasks'])[:24]:24s} {_pm(b1, 1e-6):>14s} {_pm(pam, 1e-6):>14s} "
                         f"{pam['mean'] / b1['mean']:7.2f}")
        gain = s["gain"]["baseline1"]
        gaps = ", ".join(f"{t} {_pm(g, 100, 2)}" for t, g in s["test_accuracy_gap_pam_minus"]["baseline1"].items())
        lines.append(f"{setting:18s} gain over B1: average {_pm(gain['average'], digits=2)}x, peak "
                     f"{_pm(gain['peak'], digits=2)}x over {len(s['seeds'])} seeds; test accuracy PAM - B1 (points): {gaps}; "
                     f"{r.get('wall_seconds', float('nan')):.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", default=SETTINGS, help=f"any of {SETTINGS}")
    parser.add_argument("--seeds", type=int, nargs="+", help="override every setting's seeds")
    parser.add_argument("--out", type=Path, default=Path("bench-gain-out"))
    parser.add_argument("--force", action="store_true", help="rerun settings whose results exist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, help="pruning runs of a seed at once (default: CPU cores / --threads)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {SETTINGS}")
    torch.set_num_threads(args.threads)
    workers = args.workers if args.workers is not None else default_workers(args.threads)
    if workers < 1:
        parser.error(f"--workers must be >= 1, got {workers}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s) in each "
          f"of {workers} pruning worker(s), torch {torch.__version__}")
    results = {s: run_setting(s, args.seeds, args.out, args.force, not args.no_progress, workers) for s in args.settings}
    print()
    print(summary_table(results))


if __name__ == "__main__":
    main()
