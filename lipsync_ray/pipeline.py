"""Run one video in-process: plan, then Prepare -> Generate -> Compose chunk by chunk (the CLI's `run`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import LipSyncConfig
from .stages import Compose, Generate, NoFaceError, Prepare, plan_video


@dataclass
class RunResult:
    output: Path
    frames: int
    seconds: float
    faceless_frames: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


class LipSyncPipeline:
    """The three stages set up once, reusable across videos."""

    def __init__(self, cfg: LipSyncConfig):
        self.cfg = cfg
        self.prepare, self.generate, self.compose = Prepare(cfg), Generate(cfg), Compose(cfg)
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
            for chunk in plan.chunks:
                item = self.generate(self.prepare(plan, chunk))
                counts["faces"] += int(item.flags.sum())
                counts["faceless"] += int((~item.flags).sum())
                if chunk.index == plan.chunks[-1].index and counts["faces"] == 0 and self.cfg.on_no_face == "error":
                    raise NoFaceError(f"{video}: no face found in any frame (use --on-no-face passthrough to keep it)")
                yield item

        frames = self.compose(plan, items(), output, progress)
        return RunResult(Path(output), frames, time.perf_counter() - start, counts["faceless"])
