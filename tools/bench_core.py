"""What isolation, IR checking and saving cost: per zoo architecture, K = 3, random grouping.

Run ``python tools/bench_core.py [--size 32] [--repeat 5]``. Reports the median seconds of
``organise_layers`` (which deep-copies every model before tracing), ``merge``, ``read_multitask``
(which checks every mask and that masked weights are exactly 0), ``emit`` of all tasks,
``pamfx.save`` and ``pamfx.load``, and the saved file's size against ``torch.save`` of the state
dict alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pamfx  # noqa: E402
from pamfx.zoo.models import build_model  # noqa: E402

ARCHITECTURES = ("lenet5", "vgg", "resnet", "mobilenetv2")


def median_seconds(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(arch: str, size: int, repeat: int, folder: Path) -> dict[str, float]:
    torch.manual_seed(0)
    models = {t: build_model(arch, 3 + i, 1, size, 1.0 - 0.25 * i).eval() for i, t in enumerate("ABC")}
    x = torch.randn(1, 1, size, size)
    row: dict[str, float] = {}
    row["organise"], layers = median_seconds(lambda: pamfx.organise_layers(models, x), repeat)
    grouping = pamfx.Grouping.random(layers, seed=0)
    row["merge"], merged = median_seconds(lambda: pamfx.merge(models, x, grouping, layers=layers), repeat)
    row["read_multitask"], _ = median_seconds(lambda: pamfx.read_multitask(merged), repeat)
    row["emit"], _ = median_seconds(lambda: pamfx.emit(merged, None), repeat)
    path = folder / f"{arch}.pamfx"
    row["save"], _ = median_seconds(lambda: pamfx.save(merged, path), repeat)
    row["load"], _ = median_seconds(lambda: pamfx.load(path), repeat)
    state = folder / f"{arch}.pt"
    torch.save(merged.state_dict(), state)
    row["file_kib"], row["state_dict_kib"] = path.stat().st_size / 1024, state.stat().st_size / 1024
    return row


def main() -> None:
    """Print one row per architecture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    columns = ("organise", "merge", "read_multitask", "emit", "save", "load", "file_kib", "state_dict_kib")
    print(f"{'arch':12s}" + "".join(f"{c:>16s}" for c in columns))
    with tempfile.TemporaryDirectory() as folder:
        for arch in ARCHITECTURES:
            row = bench(arch, args.size, args.repeat, Path(folder))
            print(f"{arch:12s}" + "".join(f"{row[c]:16.4f}" if "kib" not in c else f"{row[c]:16.1f}" for c in columns))


if __name__ == "__main__":
    main()
