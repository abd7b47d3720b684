"""The bulk job: a catalog of videos through Ray Data, the same stages as `lipsync-ray run`.

    catalog rows --plan (tasks)--> runs of a video's chunks --Prepare (CPU actor pool)--> a row per chunk: face crops
        + audio tokens --Generate (GPU actor pool, CPU when the job has no GPU)--> generated crops, staged under <output>/.staging
        --driver: a video's chunks all staged--> Compose (a CPU task per video): stitch, paste back, encode, upload

Why this shape:
- A Prepare actor takes a run of consecutive chunks of one video and prepares them in order, so its decoder runs on
  from one chunk into the next and each 30 s Whisper window is encoded once; chunks handed out one by one would
  make each actor seek back to a keyframe (with one keyframe: decode from frame 0) and encode again.
- Only face crops and audio tokens travel through the object store (a 256 px chunk of 100 frames is ~20 MB);
  full frames are decoded again where they are needed, so 1080p video never sits in the object store.
- Generated chunks are staged as objects keyed by (video, chunk, parameters): a rerun skips finished videos and
  reuses finished chunks of unfinished ones, and the driver only sees small status rows.
- Composing a video is one task that streams frames to the encoder once all its chunks are staged, so finished
  videos appear while others are still in the pipeline and memory stays bounded per chunk, not per video.
- Face restoration (`enhance`) runs in a video's Compose task, which then takes a quarter of a GPU beside a Generate
  actor that takes the rest (`_ComposeTasks`, `stages.ray_resources`): restored where the GPU is, with no further
  stage and no frames crossing nodes.
- A failing video (missing object, corrupt file, no face, a failing chunk) becomes a `failed` manifest row; the
  rest of the job goes on. Actors that die are restarted and their tasks retried (Ray Data's defaults for actor
  pools); a Compose task is retried up to three times.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import socket
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from . import storage
from .catalog import CatalogRow, ManifestRow, read_catalog, write_manifest
from .config import BatchConfig, LipSyncConfig
from .media import MediaError
from .plan import FPS
from .stages import (
    Compose, Generate, PreparedChunk, Prepare, VideoPlan, at_lower_priority, check_weights, compose_device, find_speaker,
    lower_priority, plan_video, ray_resources, set_up, sync_scorer,
)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _stage_prefix(job: BatchConfig, row: CatalogRow, cfg: LipSyncConfig) -> str:
    """Where a video's generated chunks wait for Compose; the key changes with anything that changes them."""
    key = hashlib.sha1(json.dumps([row.video, row.audio, cfg.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    return storage.join(job.output, ".staging", f"{row.id}-{key}")


def _chunk_url(prefix: str, index: int) -> str:
    return storage.join(prefix, f"chunk-{index:05d}.npz")


class _Plans:
    """Plans of the last few videos a worker saw (chunks of one video arrive close together)."""

    def __init__(self, inputs: storage.InputCache):
        self.inputs, self._plans = inputs, {}

    def get(self, row: CatalogRow, cfg: LipSyncConfig) -> VideoPlan:
        key = (row.video, row.audio, cfg.model_dump_json())  # rows of one clip may differ in length mode or chunking
        if key not in self._plans:
            self._plans = dict(list(self._plans.items())[-3:])
            self._plans[key] = plan_video(row.video, row.audio, cfg, self.inputs)
        return self._plans[key]


# the Prepare pool's upper bound per GPU of the cluster when the job gives none: an unbounded pool grew over every
# CPU of a GPU host while its chunks waited for the GPU (docs/performance.md)
PREPARE_PER_GPU = 4

NO_SPEAKER = [float("nan")] * 4  # a run row's `speaker` box when planning found none (it does for face="speaker")


def plan_runs(record: dict[str, Any], job: BatchConfig, rows: dict[str, CatalogRow]) -> list[dict[str, Any]]:
    """flat_map: one catalog row (by `id`) -> one row per run of `chunks_per_prepare` chunks [first, stop) (or one
    row saying why the video cannot be planned)."""
    row = rows[record["id"]]
    inputs = storage.InputCache(job.inputs, job.storage_options)
    try:
        cfg = job.pipeline.with_params(row.params)
        inputs.local(row.video, "video")  # fetched here so that errors name the input
        inputs.local(row.audio, "audio")
        plan = plan_video(row.video, row.audio, cfg, inputs, limits=job.inputs)  # limits checked before decoding
        plan = find_speaker(plan, cfg, inputs)  # face="speaker": once here
    except (MediaError, ValueError) as err:
        return [{"id": row.id, "first": -1, "stop": -1, "chunks": 0, "speaker": NO_SPEAKER, "error": str(err)}]
    finally:
        inputs.close()
    n, step = len(plan.chunks), job.chunks_per_prepare
    speaker = NO_SPEAKER if plan.speaker is None else [float(x) for x in plan.speaker]
    return [{"id": row.id, "first": a, "stop": min(a + step, n), "chunks": n, "speaker": speaker, "error": ""} for a in range(0, n, step)]


class PrepareActor:
    """Ray Data wrapper of Prepare: decode, detect, align and compute audio tokens for each chunk of a run, yielding
    a row per chunk as it is ready (so Generate starts on a run's first chunk)."""

    def __init__(self, job: BatchConfig, rows: dict[str, CatalogRow]):
        self.started_at = time.time()
        lower_priority()  # Generate actors may share the node
        self.job, self.rows = job, rows
        self.inputs = storage.InputCache(self.job.inputs, self.job.storage_options)
        self.stage = set_up(Prepare, self.job.pipeline, self.inputs)
        self.plans = _Plans(self.inputs)
        self.worker, self.ready_at = _worker(), time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
        for record in _rows(batch):
            first, stop = int(record.pop("first")), int(record.pop("stop"))
            speaker = np.asarray(record.pop("speaker"), float)
            if record["error"]:
                yield _batch(dict(record, chunk=-1, payload=b"", prepare_s=0.0, reused=False, **self._times()))
                continue
            row = self.rows[record["id"]]
            cfg = self.job.pipeline.with_params(row.params)
            error = ""
            for chunk in range(first, stop):
                # after a failed chunk the video has failed: the run's later chunks only carry the error on
                result = self._prepare(row, cfg, chunk, speaker) if not error else {"payload": b"", "error": error, "prepare_s": 0.0, "reused": False}
                error = result["error"]
                yield _batch(dict(record, chunk=chunk, **result, **self._times()))

    def _times(self) -> dict[str, Any]:
        """A row's timeline columns (wall clock): when this actor started and was ready, when the row left it, and
        which actor it was."""
        return {
            "prepare_started_at": self.started_at, "prepare_ready_at": self.ready_at, "prepared_at": time.time(),
            "prepare_worker": self.worker,
        }

    def _prepare(self, row: CatalogRow, cfg: LipSyncConfig, chunk: int, speaker: np.ndarray) -> dict[str, Any]:
        payload, error, reused = b"", "", False
        start = time.perf_counter()
        try:
            reused = storage.exists(_chunk_url(_stage_prefix(self.job, row, cfg), chunk), self.job.storage_options)
            if not reused:
                plan = self.plans.get(row, cfg)
                plan = plan if np.isnan(speaker).all() else replace(plan, speaker=speaker)
                payload = pickle.dumps(self.stage(plan, plan.chunks[chunk], cfg), protocol=5)
        except Exception as err:  # noqa: BLE001 - one video fails, the job goes on
            error = str(err) if isinstance(err, MediaError) else f"chunk {chunk}: {type(err).__name__}: {err}"
        return {"payload": payload, "error": error, "prepare_s": time.perf_counter() - start, "reused": reused}


class GenerateActor:
    """Ray Data wrapper of Generate: latent diffusion per chunk; results are staged, small rows go on."""

    def __init__(self, job: BatchConfig, rows: dict[str, CatalogRow]):
        self.started_at = time.time()
        self.job, self.rows = job, rows
        self.stage = set_up(Generate, self.job.pipeline)
        self.worker, self.ready_at = _worker(), time.time()
        # with `generate_prefetch` > 1 calls run in threads: one at a time in the stage, the others unpickling or staging
        self.gpu = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = defaultdict(list)
        for record in _rows(batch):
            payload = record.pop("payload")
            faces, seconds, error, generated_at = -1, 0.0, record["error"], 0.0
            if payload and not error:
                row = self.rows[record["id"]]
                cfg = self.job.pipeline.with_params(row.params)
                try:
                    prepared = pickle.loads(payload)
                    with self.gpu:
                        start = time.perf_counter()
                        item: PreparedChunk = self.stage(prepared, cfg)
                        seconds = time.perf_counter() - start  # the stage's own time, as the manifest reports it
                        generated_at = time.time()
                    faces = int(item.flags.sum())
                    _stage_chunk(item, _chunk_url(_stage_prefix(self.job, row, cfg), item.chunk.index), self.job)
                except Exception as err:  # noqa: BLE001 - one video fails, the job goes on
                    error = f"chunk {record['chunk']}: {type(err).__name__}: {err}"
            done = dict(
                record, error=error, faces=faces, generate_s=seconds, worker=self.worker, generated_at=generated_at,
                generate_started_at=self.started_at, generate_ready_at=self.ready_at,
            )
            for k, v in done.items():
                out[k].append(v)
        return out


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _batch(record: dict[str, Any]) -> dict[str, list]:
    return {k: [v] for k, v in record.items()}


def _stage_chunk(item: PreparedChunk, url: str, job: BatchConfig) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, generated=item.generated, flags=item.flags, matrices=item.matrices)
    storage.write_bytes_atomic(buffer.getvalue(), url, job.storage_options)


def _load_chunk(plan: VideoPlan, index: int, url: str, job: BatchConfig) -> PreparedChunk:
    with np.load(io.BytesIO(storage.read_bytes(url, job.storage_options))) as data:
        item = PreparedChunk(plan.chunks[index], None, data["matrices"], data["flags"], None)
        item.generated = data["generated"]
    return item


def compose_video(job: BatchConfig, row: CatalogRow) -> dict[str, Any]:
    """One video's staged chunks -> the finished mp4 at its output URL (a Ray task, or called directly)."""
    cfg = job.pipeline.with_params(row.params)
    inputs = storage.InputCache(job.inputs, job.storage_options)
    start = time.perf_counter()
    stats = {"enhance_s": 0.0}
    try:
        stage = set_up(Compose, cfg, inputs, device=compose_device(cfg))
        plan = plan_video(row.video, row.audio, cfg, inputs)
        prefix = _stage_prefix(job, row, cfg)
        items = (_load_chunk(plan, c.index, _chunk_url(prefix, c.index), job) for c in plan.chunks)
        with tempfile.TemporaryDirectory(prefix="lipsync-out-") as tmp:
            local = os.path.join(tmp, f"{row.id}.mp4")
            frames = stage(plan, items, local, stats=stats)
            storage.upload_atomic(local, row.output, job.storage_options)
            compose_s = time.perf_counter() - start
            quality = _score(job, cfg, local, row.output) if job.score else {}
        storage.remove_tree(prefix, job.storage_options)
        return {"status": "ok", "frames": frames, "input_seconds": plan.source.duration, "output_seconds": frames / FPS,
                "compose_s": compose_s, **stats, "error": "", **quality}
    except (MediaError, ValueError, OSError, RuntimeError) as err:
        return {"status": "failed", "compose_s": time.perf_counter() - start, "error": f"{row.output}: {err}"}
    finally:
        inputs.close()


def _score(job: BatchConfig, cfg: LipSyncConfig, path: str, output: str) -> dict[str, Any]:
    """`--score`: the finished output's SyncNet columns (against its own audio), their seconds, and its status:
    low_sync below `min_confidence`, or when it cannot be scored (no face seen long enough: the reason is its error)."""
    start = time.perf_counter()
    try:
        scorer = sync_scorer(cfg.score_model, cfg.checkpoints, cfg.detector, compose_device(cfg))
        scores, note = scorer(path).columns(), ""
    except (MediaError, ValueError) as err:
        scores, note = {}, f"not scored: {str(err).replace(path, output)}"
    low = job.min_confidence is not None and scores.get("lse_c", -math.inf) < job.min_confidence
    return {**scores, "score_s": time.perf_counter() - start, "status": "low_sync" if low else "ok", "error": note}


def compose_task(job: BatchConfig, row: CatalogRow) -> dict[str, Any]:
    """`compose_video` as the Ray job runs it: below the Generate actors' CPU priority, since they may share the
    node (a GPU actor waiting for a core leaves its GPU idle; a video's Compose can wait)."""
    return at_lower_priority(compose_video, job, row)


def _restores(job: BatchConfig, row: CatalogRow) -> bool:
    """The row's video has its faces restored."""
    return row.params.get("enhance", job.pipeline.enhance) != "none"


class _ComposeTasks:
    """`compose_task` as Ray tasks: a CPU each, and for a video whose faces are restored a share of a GPU as well
    (`ray_resources`), so that restoration runs where the GPU is, beside a Generate actor that leaves it room."""

    def __init__(self, ray, gpu: bool):
        self.task, self.gpu = ray.remote(max_retries=3)(compose_task), gpu

    def remote(self, job: BatchConfig, row: CatalogRow):
        return self.task.options(**ray_resources(Compose, self.gpu, _restores(job, row))).remote(job, row)


@dataclass
class _Video:
    """What the driver knows of a video while its chunks come through."""

    row: CatalogRow
    chunks: int = 0
    seen: set[int] = field(default_factory=set)  # a retried Prepare call yields its run's chunks again
    faces: int = 0
    reused: int = 0
    prepare_s: float = 0.0
    generate_s: float = 0.0
    workers: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> bool:
        """Count one chunk's row; True when it was the video's last chunk."""
        chunk = int(record["chunk"])
        if chunk in self.seen:
            return False
        self.chunks = int(record["chunks"])
        self.seen.add(chunk)
        self.prepare_s += float(record["prepare_s"])
        self.generate_s += float(record["generate_s"])
        self.reused += bool(record["reused"])
        if record["generate_s"]:
            self.workers.add(str(record["worker"]))
        if record["error"]:
            self.errors.append(str(record["error"]))
        self.faces += max(int(record["faces"]), 0)
        return len(self.seen) == self.chunks


class _Driver:
    """The driver's bookkeeping: chunk rows in, a video's Compose task out once all its chunks are staged, and a
    manifest row for each video as it finishes (`on_video` hears of each)."""

    def __init__(
        self, job: BatchConfig, rows: list[CatalogRow], on_video: Callable[[ManifestRow], None] | None,
        on_chunk: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.job, self.on_video, self.on_chunk = job, on_video, on_chunk
        self.videos = {r.id: _Video(r) for r in rows}
        self.done: list[ManifestRow] = []
        self.pending: dict[Any, _Video] = {}  # Compose tasks

    def finish(self, v: _Video, status: str, error: str = "", **extra) -> None:
        row = ManifestRow(v.row.id, v.row.video, v.row.audio, v.row.output, status, error, **extra)
        self.done.append(row)
        if self.on_video:
            self.on_video(row)

    def chunk(self, record: dict[str, Any], compose) -> None:
        if self.on_chunk:
            self.on_chunk(record)
        v = self.videos[record["id"]]
        if record["chunk"] < 0:
            self.finish(v, "failed", record["error"])
        elif v.add(record):
            self._complete(v, compose)

    def _complete(self, v: _Video, compose) -> None:
        cfg = self.job.pipeline.with_params(v.row.params)
        no_face = v.faces == 0 and not v.reused  # reused chunks had faces counted last time
        if v.errors:
            self.finish(v, "failed", "; ".join(v.errors[:3]), chunks=v.chunks)
        elif no_face and cfg.on_no_face == "error":
            storage.remove_tree(_stage_prefix(self.job, v.row, cfg), self.job.storage_options)
            self.finish(v, "failed", f"{v.row.video}: no face found in any frame", chunks=v.chunks)
        else:
            self.pending[compose.remote(self.job, v.row)] = v

    def collect(self, ray, timeout: float | None) -> None:
        """Manifest rows for the Compose tasks that finished within `timeout`."""
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in ready:
            v = self.pending.pop(ref)
            result = ray.get(ref)
            stats = dict(
                chunks=v.chunks, chunks_reused=v.reused, prepare_s=v.prepare_s, generate_s=v.generate_s,
                workers=sorted(v.workers),
            )
            self.finish(v, **result, **stats)  # status: ok, low_sync (--min-confidence) or failed


def run_batch(
    job: BatchConfig, on_video: Callable[[ManifestRow], None] | None = None,
    on_chunk: Callable[[dict[str, Any]], None] | None = None,
) -> list[ManifestRow]:
    """Run the job on the connected Ray cluster; returns (and writes) the manifest, one row per catalog row.
    `on_video` hears of each manifest row as it is done; `on_chunk` of each chunk's row as it leaves the GPU stage
    (with its timeline: when its actors were ready, when it was prepared and generated, and by which workers)."""
    import ray

    rows = read_catalog(job.catalog, job.output, job.storage_options, job.output_prefixes)
    driver = _Driver(job, rows, on_video, on_chunk)
    todo = []
    for v in driver.videos.values():
        if storage.exists(v.row.output, job.storage_options):
            _remove_staged(job, v.row)
            driver.finish(v, "skipped", "output exists")
        else:
            todo.append(v.row)
    _check_weights(job, todo)
    if todo:
        # one chunk per block, so chunks spread over the actors instead of queueing behind their video's block
        context = ray.data.DataContext.get_current()
        options = context.execution_options
        block_size, context.target_max_block_size = context.target_max_block_size, 1
        cluster_gpus = ray.cluster_resources().get("GPU", 0)  # when the job starts
        # Compose tasks run beside the Ray Data stages: a CPU per GPU is kept from the Prepare pool's growth for them
        excluded, options.exclude_resources = options.exclude_resources, options.exclude_resources.add(
            ray.data.ExecutionResources(cpu=max(1, cluster_gpus))
        )
        try:
            _run_pipeline(job, todo, driver, ray, cluster_gpus)
        finally:
            context.target_max_block_size, options.exclude_resources = block_size, excluded
    order = {r.id: i for i, r in enumerate(rows)}
    manifest = sorted(driver.done, key=lambda m: order[m.id])
    write_manifest(manifest, job.manifest_url, job.storage_options)
    return manifest


def _remove_staged(job: BatchConfig, row: CatalogRow) -> None:
    """A finished video's staged chunks, left behind when its Compose task or the driver died between the upload
    and the clean-up."""
    try:
        cfg = job.pipeline.with_params(row.params)
    except ValueError:  # a row that cannot have been staged
        return
    storage.remove_tree(_stage_prefix(job, row, cfg), job.storage_options)


def _check_weights(job: BatchConfig, rows: list[CatalogRow]) -> None:
    """An optional model that the job or a row asks for without its weights: `stages.MissingWeights` before the job
    starts. Rows with bad parameters are left to fail on their own."""
    for row in rows:
        try:
            cfg = job.pipeline.with_params(row.params)
        except ValueError:
            continue
        check_weights(cfg, scoring=job.score)


@dataclass(frozen=True)
class Pools:
    """The actor pools' bounds (min, max; max None: no bound) and the calls in flight at each Generate actor."""

    prepare: tuple[int, int]
    generate: tuple[int, int | None]
    generate_in_flight: int

    @classmethod
    def of(cls, job: BatchConfig, cluster_gpus: int, gpu: bool) -> Pools:
        """From the job's options and the GPUs the cluster has when the job starts. The Prepare pool's default
        bound follows the GPUs the GPU pool may reach: those the cluster has, or more where `generate_actors`
        allows them. Ray Data grows a pool only while its calls in flight are 1.75x those its actors can run at
        once (`actor_pool_util_upscaling_threshold`): an actor of a GPU pool that may grow holds as many calls
        again queued (Ray Data's default; with none queued the pool never grew), one of a fixed pool none (a finer
        split of the job's last chunks)."""
        generate = job.generate_actors[0], job.generate_actors[1] or (None if gpu else 1)
        low, high = job.prepare_actors
        gpus = max(1, cluster_gpus, (generate[1] or 0) if gpu else 0)
        prefetch = job.generate_prefetch
        return cls((low, high or max(low, PREPARE_PER_GPU * gpus)), generate, prefetch if generate[0] == generate[1] else 2 * prefetch)


def _run_pipeline(job: BatchConfig, todo: list[CatalogRow], driver: _Driver, ray, cluster_gpus: float) -> None:
    """Ray Data rows carry a video's id; every stage gets the job and the catalog rows once, as objects.
    `cluster_gpus`: the GPUs the cluster has when the job starts."""
    from ray.data import ActorPoolStrategy

    gpu = job.gpu if job.gpu is not None else cluster_gpus > 0
    restoring = any(_restores(job, row) for row in todo)
    shared = {"job": job, "rows": {r.id: r for r in todo}}
    ds = ray.data.from_items([{"id": r.id} for r in todo], override_num_blocks=len(todo))
    ds = ds.flat_map(plan_runs, fn_kwargs=shared, num_cpus=0.5)
    pools = Pools.of(job, int(cluster_gpus), gpu)
    ds = ds.map_batches(
        PrepareActor, fn_constructor_kwargs=shared, batch_size=1, **ray_resources(Prepare),
        memory=job.prepare_memory_gb * 2**30, compute=ActorPoolStrategy(min_size=pools.prepare[0], max_size=pools.prepare[1]),
    )
    prefetch = job.generate_prefetch
    ds = ds.map_batches(
        GenerateActor, fn_constructor_kwargs=shared, batch_size=job.chunks_per_batch,
        # the calls at an actor run in threads; its lock lets one at a time into the stage
        compute=ActorPoolStrategy(
            min_size=pools.generate[0], max_size=pools.generate[1], max_tasks_in_flight_per_actor=pools.generate_in_flight,
            max_concurrent_calls_per_actor=prefetch, enable_true_multi_threading=prefetch > 1,
        ),
        **ray_resources(Generate, gpu, restoring),
    )
    compose = _ComposeTasks(ray, gpu)
    for record in ds.iter_rows():
        driver.chunk(record, compose)
        if driver.pending:
            driver.collect(ray, 0)
    while driver.pending:
        driver.collect(ray, None)
