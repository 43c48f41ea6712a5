"""What the evaluation batch size costs: `pamfx.zoo.train.evaluate` at batch 512 against its default.

    python tools/bench_evaluate.py [--images 3000] [--size 56] [--repeat 3]

Every pruning round evaluates the candidate on the whole calibration split (3,000-5,000 tiles of
56×56 in the shipped configs), which is about a third of the demo's time. Per zoo architecture
(5 outputs, 1 input channel, full width and 0.3×, untrained, eval mode, 1 torch thread) this
times ``evaluate`` on random images at batch 512 and at `EVAL_BATCH_SIZE` (64), interleaved, and
prints the medians, their ratio and whether the accuracies and the logits are equal: the batch
size must set the speed only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pamfx.zoo.models import build_model  # noqa: E402
from pamfx.zoo.train import EVAL_BATCH_SIZE, evaluate  # noqa: E402

ARCHITECTURES = ("lenet5", "vgg", "resnet", "mobilenetv2")
OLD = 512
BATCHES = (OLD, EVAL_BATCH_SIZE)


def logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in images.split(batch_size)])


def bench(arch: str, width: float, data: TensorDataset, repeat: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = build_model(arch, 5, 1, data.tensors[0].shape[-1], width).eval()
    labels = range(5)
    times: dict[int, list[float]] = {b: [] for b in BATCHES}
    accuracy: dict[int, float] = {}
    for _ in range(repeat):
        for b in BATCHES:
            start = time.perf_counter()
            accuracy[b] = evaluate(model, data, labels, batch_size=b)
            times[b].append(time.perf_counter() - start)
    seconds = {b: statistics.median(t) for b, t in times.items()}
    images = data.tensors[0]
    return {"seconds": seconds, "ratio": seconds[OLD] / seconds[EVAL_BATCH_SIZE],
            "same_accuracy": accuracy[OLD] == accuracy[EVAL_BATCH_SIZE],
            "same_logits": torch.equal(logits(model, images, OLD), logits(model, images, EVAL_BATCH_SIZE))}


def main() -> None:
    """Print one row per architecture and width."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(args.images, 1, args.size, args.size, generator=generator),
                         torch.randint(0, 2, (args.images, 5), generator=generator).float())
    print(f"evaluate on {args.images} images of {args.size}×{args.size}, 1 thread, median of {args.repeat}")
    new = EVAL_BATCH_SIZE
    print(f"{'model':<12} {'width':>5} {f's @{OLD}':>8} {f's @{new}':>8} {f'{OLD}/{new}':>7}  same accuracy, logits")
    for arch in ARCHITECTURES:
        for width in (1.0, 0.3):
            row = bench(arch, width, data, args.repeat)
            s = row["seconds"]
            print(f"{arch:<12} {width:>5} {s[OLD]:>8.3f} {s[new]:>8.3f} {row['ratio']:>7.2f}  "
                  f"{row['same_accuracy']}, {row['same_logits']}")


if __name__ == "__main__":
    main()
