"""Data sets for demos, tests and benchmarks: multi-label tiled digits (docs/design.md §8)."""
from pamfx.data.splits import inclusion_split, overlap_split
from pamfx.data.tiled import DATASETS, DigitSource, TiledDataset, TiledDigits, load_dataset, source_digits, task_split

__all__ = ["DATASETS", "DigitSource", "TiledDataset", "TiledDigits", "inclusion_split", "load_dataset",
           "overlap_split", "source_digits", "task_split"]
