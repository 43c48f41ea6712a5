"""Label splits for the ablations of Sec. 4.6.3: task pairs of chosen relatedness and task inclusion.

`task_split` partitions the labels; these splits let two tasks share labels, so that their
relatedness I(Y^A; Y^B) grows with the overlap (Sec. 4.6.3.2) or one task's labels are a subset of
the other's (Sec. 4.6.3.3).
"""
from __future__ import annotations

from pamfx.data.tiled import NUM_CLASSES
from pamfx.errors import InputError


def _name(prefix: str, labels: list[int]) -> str:
    return f"{prefix}_digits_{labels[0]}_{labels[-1]}"


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def overlap_split(task_size: int, overlap: int, num_labels: int = NUM_CLASSES) -> dict[str, list[int]]:
    """Two tasks of ``task_size`` consecutive labels each, sharing exactly ``overlap`` labels (Sec. 4.6.3.2).

    Task A holds labels ``0..task_size-1``; task B starts ``task_size - overlap`` labels later.
    ``overlap = 0`` gives disjoint tasks, ``overlap = task_size`` two tasks with the same labels.
    Names are ``a_digits_<first>_<last>`` and ``b_digits_<first>_<last>``.
    """
    _check_int("task_size", task_size, 1, num_labels)
    _check_int("overlap", overlap, 0, task_size)
    if 2 * task_size - overlap > num_labels:
        raise InputError(f"two tasks of {task_size} labels sharing {overlap} need {2 * task_size - overlap} labels; "
                         f"there are {num_labels}")
    a = list(range(task_size))
    b = list(range(task_size - overlap, 2 * task_size - overlap))
    return {_name("a", a): a, _name("b", b): b}


def inclusion_split(size_a: int, size_b: int, num_labels: int = NUM_CLASSES) -> dict[str, list[int]]:
    """Task A with labels ``0..size_a-1`` and task B with its first ``size_b`` labels, B ⊂ A (Sec. 4.6.3.3)."""
    _check_int("size_a", size_a, 2, num_labels)
    _check_int("size_b", size_b, 1, size_a - 1)
    a, b = list(range(size_a)), list(range(size_b))
    return {_name("a", a): a, _name("b", b): b}
