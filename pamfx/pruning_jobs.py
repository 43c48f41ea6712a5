"""Pruning runs in worker processes: every pruning run of one seed, of every method, at once.

A pruning run (`pamfx.experiment` prunes each network, or each candidate of PAM, one or more times)
depends only on its network, its restart index and its seed: it draws its own data order and
fine-tuning seeds, and never modifies its input. So the runs of one seed are independent, and
`run_jobs` runs them on ``workers`` processes at once. Each job runs in a fresh *spawned* process
(``maxtasksperchild=1``: no job sees what another left behind; not forked: a process forked after
torch ran OpenMP threads hangs in its first parallel op) with this process's torch threads. The
network travels both ways encoded as data (`pamfx.serialization.encode`: a pickled GraphModule
loses its ``node.meta``), the pruner pickled. The result is the same as running the jobs one after
another, which is what ``workers=1`` does, in this process. As with any spawned worker, a script
that calls this with ``workers > 1`` must guard its entry point with ``if __name__ == "__main__"``.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx

from pamfx.errors import InputError
from pamfx.passes.prune import Trajectory
from pamfx.progress import progress_bar
from pamfx.serialization import decode, encode

Pruner = Callable[[fx.GraphModule, int], Trajectory]


@dataclass
class PruningJob:
    """One pruning run: ``pruner(network, restart)``. ``size`` orders the work (largest first, so
    the last job to finish is a short one); any number that grows with the run's duration."""

    name: str
    pruner: Pruner
    network: fx.GraphModule
    restart: int = 0
    size: float = 1.0


@dataclass
class JobResult:
    trajectory: Trajectory
    seconds: float


def run_jobs(jobs: Sequence[PruningJob], workers: int = 1, progress: bool = True) -> list[JobResult]:
    """Run every job, on up to ``workers`` spawned processes at once (largest ``size`` first);
    results in the order of ``jobs``. Progress is one bar over the jobs."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [_timed(job.pruner, job.network, job.restart) for job in jobs]
    threads = torch.get_num_threads()
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].size)
    payloads = [pickle.dumps((i, jobs[i].name, jobs[i].pruner, encode(jobs[i].network), jobs[i].restart, threads))
                for i in order]
    results: dict[int, JobResult] = {}
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool, \
            progress_bar(total=len(jobs), desc="pruning runs", enabled=progress) as bar:
        for answer in pool.imap_unordered(_work, payloads):
            index, packed, seconds = pickle.loads(answer)
            results[index] = JobResult(_unpack(packed, jobs[index].name), seconds)
            bar.update(1)
    return [results[i] for i in range(len(jobs))]


def _timed(pruner: Pruner, network: fx.GraphModule, restart: int) -> JobResult:
    start = time.perf_counter()
    trajectory = pruner(network, restart)
    return JobResult(trajectory, time.perf_counter() - start)


def _work(payload: bytes) -> bytes:
    """One job in a worker. Payload and answer travel as pickled bytes: handed to a multiprocessing
    queue as objects, torch would pass every tensor as a shared-memory file descriptor, and a worker
    sending a trajectory of many networks blocked while the main process fetched them."""
    index, name, pruner, network, restart, threads = pickle.loads(payload)
    torch.set_num_threads(threads)
    result = _timed(pruner, decode(network, f"pruning run {name!r}"), restart)
    return pickle.dumps((index, _pack(result.trajectory), result.seconds))


def _pack(trajectory: Trajectory) -> Trajectory:
    """``trajectory`` with every checkpoint's network as `encode` data (a plain dict)."""
    return dataclasses.replace(trajectory, checkpoints=[
        dataclasses.replace(c, network=None if c.network is None else encode(c.network))
        for c in trajectory.checkpoints])


def _unpack(packed: Trajectory, name: str) -> Trajectory:
    return dataclasses.replace(packed, checkpoints=[
        dataclasses.replace(c, network=None if c.network is None else
                            decode(c.network, f"pruning run {name!r}, round {c.round}"))
        for c in packed.checkpoints])
