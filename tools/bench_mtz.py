"""Benchmark of `pamfx.mtz_merge` (baseline 2) on trained networks: accuracy kept, sharing, time.

Run ``python tools/bench_mtz.py [--dataset tiled-digits] [--model lenet5] [--tasks 2]``. It trains
(or loads from the cache) one zoo network per task with the defaults of ``pamfx run``, zips them
with the paper's setting (every pair, ``zip_degree=1``) once without and once with the joint
fine-tune after each layer, and prints each task's test accuracy (mean binary accuracy) for the
originals and both zipped networks, the FLOPs of running all tasks, and the wall time of zipping.
Nothing is pruned here: that is the comparison's job.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pamfx  # noqa: E402
from pamfx.data import load_dataset, task_split  # noqa: E402
from pamfx.passes.finetune import multilabel_loss  # noqa: E402
from pamfx.zoo.train import evaluate_multitask, get_or_train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="tiled-digits")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--calib", type=int, default=500, help="calibration samples for the Hessians")
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    data = load_dataset(args.dataset, seed=args.seed)
    label_map = task_split(args.tasks)
    models = {
        t: get_or_train(data, args.model, label_map[t], epochs=args.epochs, seed=args.seed + i, progress=False).eval()
        for i, t in enumerate(label_map)
    }
    example = data.train[0][0][None]
    calib = data.calib.images[: args.calib]
    train = DataLoader(data.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    rows = {"originals": {t: evaluate_multitask(m, data.test, {t: label_map[t]})[t] for t, m in models.items()}}
    flops = {"originals": sum(pamfx.cost(m, example_input=example).flops for m in models.values())}
    seconds = {}
    for name, kwargs in [
        ("mtz", {}),
        ("mtz + fine-tune", {"train_loader": train, "loss_fn": multilabel_loss(label_map),
                             "finetune_steps": args.finetune_steps}),
    ]:
        start = time.perf_counter()
        zipped = pamfx.mtz_merge(models, example, calib, seed=args.seed, progress=False, **kwargs)
        seconds[name] = time.perf_counter() - start
        rows[name] = evaluate_multitask(zipped, data.test, label_map)
        flops[name] = pamfx.cost(zipped).flops
    print(f"{args.model} on {args.dataset}, {args.tasks} tasks; {args.calib} calibration samples; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'network':<18}" + "".join(f"{t:>14}" for t in label_map) + f"{'MFLOPs all':>12}{'seconds':>9}")
    for name, acc in rows.items():
        timing = f"{seconds[name]:9.1f}" if name in seconds else f"{'':>9}"
        print(f"{name:<18}" + "".join(f"{100 * acc[t]:13.2f}%" for t in label_map) + f"{flops[name] / 1e6:12.3f}" + timing)


if __name__ == "__main__":
    main()
