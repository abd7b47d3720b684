"""Run one video in-process: plan, then Prepare -> Generate -> Compose chunk by chunk (the CLI's `run`).

The three stages run at once on different chunks, each in its own thread: Prepare works ahead while the GPU
generates, and Compose pastes and encodes the previous chunk meanwhile (torch, PyAV and the detector release the
GIL). Lookahead is bounded, so memory stays a few chunks whatever the video's length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .config import LipSyncConfig
from .stages import Compose, Generate, NoFaceError, Prepare, plan_video

A, B = TypeVar("A"), TypeVar("B")


@dataclass
class RunResult:
    output: Path
    frames: int
    seconds: float
    faceless_frames: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def ahead(fn: Callable[[A], B], inputs: Iterable[A], depth: int) -> Iterator[B]:
    """`map(fn, inputs)` in order, computed in a background thread up to `depth` results ahead of the consumer."""
    with ThreadPoolExecutor(1) as pool:
        source = iter(inputs)
        pending = deque(pool.submit(fn, x) for _, x in zip(range(depth), source))
        try:
            while pending:
                result = pending.popleft().result()
                for x in source:  # refill one slot, if any input is left
                    pending.append(pool.submit(fn, x))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()


class LipSyncPipeline:
    """The three stages set up once, reusable across videos."""

    def __init__(self, cfg: LipSyncConfig):
        self.cfg = cfg
        device = cfg.resolved_device()
        self.prepare, self.generate = Prepare(cfg, device=device), Generate(cfg)
        self.compose = Compose(cfg, device=device)
        for stage in (self.prepare, self.generate, self.compose):
            stage.setup()

    def run(
        self, video: str | Path, audio: str | Path, output: str | Path,
        progress: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None,
    ) -> RunResult:
        start = time.perf_counter()
        plan = plan_video(video, audio, self.cfg)
        if on_plan:
            on_plan(plan.n_out)
        counts = {"faceless": 0, "faces": 0}

        def items():
            prepared = ahead(lambda chunk: self.prepare(plan, chunk), plan.chunks, depth=2)
            generated = ahead(self.generate, prepared, depth=1)
            try:
                for item in generated:
                    counts["faces"] += int(item.flags.sum())
                    counts["faceless"] += int((~item.flags).sum())
                    if item.chunk.index == plan.chunks[-1].index and counts["faces"] == 0 and self.cfg.on_no_face == "error":
                        raise NoFaceError(f"{video}: no face found in any frame (use --on-no-face passthrough to keep it)")
                    yield item
            finally:  # a failure anywhere stops both stages' threads before the error propagates
                generated.close()
                prepared.close()

        frames = self.compose(plan, items(), output, progress)
        return RunResult(Path(output), frames, time.perf_counter() - start, counts["faceless"])
