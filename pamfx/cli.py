"""Command line: ``pamfx demo`` (the built-in comparison) and ``pamfx run CONFIG``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pamfx.errors import InputError, PamfxError
from pamfx.experiment import ExperimentConfig, results_dict, run_comparison
from pamfx.report import format_table, write_report

DESCRIPTION = """\
pamfx merges K single-task networks into one multitask network with Pruning-Aware Merging (PAM),
prunes it, and compares the cost of every task combination with baseline 1 (each network
pruned on its own) and optionally baseline 2 (MTZ), all pruned by the same pruner and held to the
same accuracy on the calibration split (the cheapest checkpoint within the tolerance).

  pamfx demo                 tiled-mnist, 2 tasks, LeNet-5, P2 pruning, one seed
  pamfx run CONFIG.toml      any configuration (TOML or YAML) of ExperimentConfig's keys, e.g.
                             dataset = "tiled-digits" | "tiled-mnist", model = "lenet5" |
                             "vgg" | "resnet" | "mobilenetv2", tasks = 2 | 5, pruner = "taylor"
                             | "vib", methods = ["baseline1", "mtz", "pam"], seeds = [0, 1, 2],
                             alpha, tolerance, combination_weights, ... (configs/ has examples)
  pamfx run configs/lenet5-2tasks-p2.toml --seeds 0 1 2
  pamfx reproduce [--quick]  the paper's Sec. 4.6 (Tables 4.2/4.4/4.5, Figs. 4.5-4.7, ablations)
                             re-measured: REPRODUCTION.md with the paper's numbers beside ours

Results (table with mean ± std over seeds, results.json, results.csv, PNG plots including the
FLOPs-accuracy frontier) go to --out (default ./pamfx-out). Every combination is also timed (PAM's
emitted module against baseline 1's networks, torch and onnxruntime, batch 1 and 8; latency = false
turns it off; docs/latency.md).
"""


def load_config(path: Path) -> ExperimentConfig:
    """Read an experiment configuration from a TOML or YAML file."""
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        values: Any = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError("reading YAML configs needs PyYAML: pip install 'pamfx[config]'") from None
        values = yaml.safe_load(text) or {}
    else:
        raise InputError(f"config {str(path)!r}: use a .toml, .yaml or .yml file")
    if not isinstance(values, dict):
        raise InputError(f"config {str(path)!r} must hold a table of keys")
    return ExperimentConfig.from_mapping(values)


def default_workers(threads_per_worker: int) -> int:
    """Worker processes that fill the CPU cores when each runs ``threads_per_worker`` torch threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, threads_per_worker))


def _run(config: ExperimentConfig, out: Path, progress: bool, workers: int) -> int:
    started = time.perf_counter()
    runs = run_comparison(config, progress=progress, workers=workers)
    results = results_dict(config, runs)
    paths = write_report(results, out, runs[0].regrouping)
    print()
    print(format_table(results))
    print()
    print(f"finished in {time.perf_counter() - started:.0f} s; results and plots:")
    for kind, path in paths.items():
        print(f"  {kind:17s} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pamfx", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("demo", "run the built-in comparison"), ("run", "run the comparison of a config file")):
        cmd = sub.add_parser(name, help=text, description=text)
        if name == "run":
            cmd.add_argument("config", type=Path, help="a TOML or YAML file of experiment settings")
        cmd.add_argument("--seeds", type=int, nargs="+", help="run the whole comparison for these seeds (mean ± std)")
        cmd.add_argument("--out", type=Path, default=Path("pamfx-out"), help="where results and plots go (default: pamfx-out)")
        cmd.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for small nets)")
        cmd.add_argument("--workers", type=int, help="pruning runs at once, in worker processes of --threads "
                         "threads each (default: CPU cores / --threads; the results do not depend on it)")
        cmd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    text = "re-measure the paper's Sec. 4.6 and write REPRODUCTION.md with plots"
    cmd = sub.add_parser("reproduce", help=text, description=text)
    cmd.add_argument("--quick", action="store_true", help="the reduced plan (16x16 tiles, 2 seeds): minutes, not hours")
    cmd.add_argument("--seeds", type=int, nargs="+", help="override the plan's seeds")
    cmd.add_argument("--out", type=Path, default=Path("pamfx-reproduction"), help="output folder (default: pamfx-reproduction)")
    cmd.add_argument("--force", action="store_true", help="rerun runs whose results.json already holds the same config")
    cmd.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    cmd.add_argument("--jobs", type=int, default=1, help="seeds at once, in worker processes (default 1)")
    cmd.add_argument("--workers", type=int, help="pruning runs of each seed at once, in worker processes "
                     "(default: CPU cores / (--threads x --jobs); the results do not depend on it)")
    cmd.add_argument("--report", action="store_true",
                     help="run nothing: write REPRODUCTION.md from the runs --out already holds (the rest marked not run)")
    cmd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _reproduce(args: argparse.Namespace) -> int:
    from pamfx.reproduce import FULL, QUICK, reproduce

    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=list(args.seeds))
    plan.validate()
    command = "pamfx reproduce" + " --quick" * args.quick + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
    workers = args.workers if args.workers is not None else default_workers(args.threads * max(1, args.jobs))
    path = reproduce(args.out, plan, force=args.force, progress=not args.no_progress, command=command, jobs=args.jobs,
                     report_only=args.report, workers=workers)
    print(f"written: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        config = ExperimentConfig() if args.command == "demo" else load_config(args.config)
        if args.seeds:
            config = dataclasses.replace(config, seeds=list(args.seeds))
            config.validate()
        workers = args.workers if args.workers is not None else default_workers(args.threads)
        if workers < 1:
            raise InputError(f"--workers must be >= 1, got {workers}")
        return _run(config, args.out, progress=not args.no_progress, workers=workers)
    except PamfxError as err:
        print(f"pamfx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
