"""Run one video in-process: plan, then Prepare -> Generate -> Compose chunk by chunk (the CLI's `run`).

The three stages run at once on different chunks: Prepare works ahead while the GPU generates, and Compose pastes
and encodes the previous chunk meanwhile. Prepare runs in a thread, or with `prepare_workers=N` (by default on GPU
hosts) in N worker processes: its Python-heavy detection then no longer holds the GIL that the thread launching
the GPU's kernels needs. Lookahead is bounded, so memory stays a few chunks whatever the video's length.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing.synchronize import Barrier
from pathlib import Path

import torch

from .ahead import ahead
from .config import InputPolicy, LipSyncConfig
from .stages import (
    Compose, Generate, NoFaceError, Prepare, PreparedPart, VideoPlan, assemble, check_weights, chunk_parts,
    find_speaker, kept, lower_priority, plan_video, set_up,
)

@dataclass
class RunResult:
    output: Path
    frames: int
    seconds: float
    faceless_frames: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


_worker: Prepare | Exception | None = None  # this Prepare worker process's stage, or why its setup failed
_started: Barrier | None = None  # passed by all the pool's workers once set up (`_wait_for_all_workers`)
WORKER_START_TIMEOUT = 600  # seconds for every worker to load its models


def _start_worker(cfg_json: str, threads: int, started: Barrier) -> None:
    """Process-pool initializer: set Prepare up once. A setup error is kept and raised by every call, so it
    reaches the caller with its message (an initializer's own exception would only break the pool)."""
    global _worker, _started
    _started = started
    lower_priority()
    torch.set_num_threads(threads)  # the workers and the main process's stages share the cores
    try:
        _worker = set_up(Prepare, LipSyncConfig.model_validate_json(cfg_json))
    except Exception as err:
        _worker = err


def _check_worker() -> None:
    """Raise this worker's setup error, if its setup failed."""
    if isinstance(_worker, Exception):
        raise _worker


def _wait_for_all_workers() -> None:
    """Block until every worker has set up, then check this one. The pool starts a worker only when a task finds
    none idle: N of these calls, each holding its worker at the barrier, start all N before the first video."""
    _started.wait(WORKER_START_TIMEOUT)
    _check_worker()


def _prepare_in_worker(plan: VideoPlan, frames: range) -> PreparedPart:
    _check_worker()
    return _worker.part(plan, frames)


class LipSyncPipeline:
    """The stages set up once (Prepare in its own processes with `prepare_workers`), reusable across videos.
    `limits`: the video size and audio length each video is checked against before it is decoded."""

    def __init__(self, cfg: LipSyncConfig, limits: InputPolicy | None = None):
        check_weights(cfg)  # an optional model's missing weights: before any worker or model starts
        self.cfg = cfg
        self.limits = limits or InputPolicy()
        self.workers: ProcessPoolExecutor | None = None
        self.prepare: Callable[[VideoPlan, range], PreparedPart]  # one part of a chunk (`Prepare.part`)
        self.prepare_workers = cfg.resolved_prepare_workers()
        if self.prepare_workers:  # spawned: a forked child would inherit the parent's CUDA state
            threads = max(1, (os.cpu_count() or 1) // (self.prepare_workers + 1))
            spawn = multiprocessing.get_context("spawn")
            started = spawn.Barrier(self.prepare_workers)
            self.workers = ProcessPoolExecutor(
                self.prepare_workers, spawn, _start_worker, (cfg.model_dump_json(), threads, started)
            )
            try:
                for check in [self.workers.submit(_wait_for_all_workers) for _ in range(self.prepare_workers)]:
                    check.result()
            except BaseException:
                self.close()
                raise
            self.prepare = _prepare_in_worker
        else:
            self.prepare = set_up(Prepare, cfg).part
        self.generate, self.compose = set_up(Generate, cfg), set_up(Compose, cfg, device=cfg.resolved_device())

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown(cancel_futures=True)

    def __enter__(self) -> "LipSyncPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self, video: str | Path, audio: str | Path, output: str | Path,
        progress: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None,
    ) -> RunResult:
        start = time.perf_counter()
        plan = find_speaker(plan_video(video, audio, self.cfg, limits=self.limits), self.cfg)
        if on_plan:
            on_plan(plan.n_out)
        counts = {"faceless": 0, "faces": 0}
        depth = self.prepare_workers + 1 if self.workers else 2  # parts prepared ahead

        def prepared_chunks():
            parts = chunk_parts(plan, self.prepare_workers or 1)
            done = ahead(partial(self.prepare, plan), [frames for p in parts for frames in p], depth, self.workers)
            try:
                for chunk, p in zip(plan.chunks, parts):
                    yield assemble(chunk, [next(done) for _ in p])
            finally:
                done.close()

        def items():
            prepared = prepared_chunks()
            generated = ahead(self.generate, prepared, depth=1)
            try:
                for item in generated:
                    last = item.chunk.index == plan.chunks[-1].index
                    own = item.flags[: kept(plan, item.chunk, self.cfg.window_overlap)]  # as stitched
                    counts["faces"] += int(own.sum())
                    counts["faceless"] += int((~own).sum())
                    if last and counts["faces"] == 0 and self.cfg.on_no_face == "error":
                        raise NoFaceError(f"{video}: no face found in any frame (use --on-no-face passthrough to keep it)")
                    yield item
            finally:  # a failure anywhere stops feeding both stages before the error propagates
                generated.close()
                prepared.close()

        frames = self.compose(plan, items(), output, progress)
        return RunResult(Path(output), frames, time.perf_counter() - start, counts["faceless"])
