"""Ray Serve app: online lip-sync with the stages of the bulk job.

    client --HTTP--> LipSyncAPI (ingress, CPU: limits, plan, compose)
                       |-- per chunk, all chunks at once --> PrepareDeployment (CPU) --> GenerateDeployment (GPU)
                       `-- stitch, paste back, encode in the ingress; the mp4 (or its URL) goes back

A request's chunks fan out over the Prepare and Generate replicas in parallel and come back to the same stitching
as `lipsync-ray run`, so a request gives the same frames as the CLI for the same input and seed. Overload is
answered with 503 and Retry-After by Serve's bounded queues; bad input with a 4xx JSON error naming the field, a
fault of ours with a 5xx JSON error that says no more than that. Inputs are received or fetched under the input
policy (`receive`, `storage.check_url`): uploads are cut off while they stream, URLs are checked host and redirect.
`build_app(args)` is the import path that `serve deploy`, KubeRay's RayService and `lipsync-ray serve` use.
"""

import asyncio
import functools
import hashlib
import hmac
import html
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter, Histogram
from starlette.background import BackgroundTask

from . import storage
from .config import InputPolicy, LipSyncConfig, ServeConfig
from .receive import InputError, RequestInputs
from .media import MediaError, probe_video
from .stages import (
    Compose, Generate, PreparedChunk, Prepare, check_weights, compose_device, find_speaker, plan_video, ray_resources, set_up,
)


log = logging.getLogger("ray.serve")
# the web page (lipsync_ray/static): its own files only, nothing from elsewhere
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' blob: data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


UNAVAILABLE = "temporarily unavailable, try again"  # a lost replica's requests: the client retries
OUR_FOLDERS = re.compile(r"(?<!\S)/\S*/")  # where a request's files are kept (no spaces: they are ours), up to their names


class LostRequestsAreRetryable:
    """ASGI middleware for Serve's HTTP proxy. When the ingress replica that holds a request dies, or none is up
    while Serve replaces it, the proxy returns no answer (its server then sends a bare 500) or a plain-text 503,
    which a client cannot tell from a fault; this answers them with the service's JSON error, 503 with Retry-After
    (the proxy's own, else the config's default). The app's own answers are JSON and pass unchanged."""

    def __init__(self, app, retry_after_s: int = ServeConfig.model_fields["retry_after_s"].default):
        self.app, self.retry_after_s = app, retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = replaced = False

        async def answer(message):
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                headers = {k.lower(): v for k, v in message.get("headers") or []}
                json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] in (500, 503) and not json:
                    replaced = True
                    return await self._retry(send, headers.get(b"retry-after"))
            if not replaced:  # the proxy's own body of a replaced answer is dropped
                await send(message)

        try:
            await self.app(scope, receive, answer)
        except Exception:  # noqa: BLE001 - the proxy failed before answering (its server would send a bare 500)
            if started:
                raise
            log.warning("the proxy failed a request before answering", exc_info=True)
        if not started:  # the proxy gave up without an answer (a lost replica): its server would send a bare 500
            await self._retry(send, None)

    async def _retry(self, send, retry_after: bytes | None) -> None:
        retry = retry_after.decode() if retry_after else str(self.retry_after_s)
        response = _error(503, "", UNAVAILABLE, {"Retry-After": retry})
        await send({"type": "http.response.start", "status": 503, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def proxy_middlewares() -> list:
    """Serve's HTTP proxy middlewares. Serve takes them only from the import path in the environment variable
    `PROXY_CALLBACK_ENV` of the proxy's process: set on every node of a cluster (`cluster/`), and by
    `lipsync-ray serve` before it starts a local Ray."""
    from starlette.middleware import Middleware

    return [Middleware(LostRequestsAreRetryable)]


PROXY_CALLBACK_ENV = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", f"{__name__}.{proxy_middlewares.__name__}")


def _error(status: int, field_name: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field_name, "message": message}}, status_code=status, headers=headers)


def _input_error(err: Exception) -> InputError:
    """What the client is told about `err`: its own error as it is, a fault of ours in a few generic words (the
    details go to the replica's log)."""
    if isinstance(err, InputError):
        return err
    if isinstance(err, storage.InputRefused):
        status = 413 if isinstance(err, storage.InputTooLarge) else 408 if isinstance(err, storage.InputTimeout) else 422
        return InputError(status, err.field, err.message)
    if isinstance(err, RayActorError):  # a Prepare or Generate replica went away: it is replaced
        return InputError(503, "", UNAVAILABLE)
    cause = getattr(err, "cause", err)  # a stage's own exception, inside Ray's RayTaskError
    if isinstance(cause, MediaError):  # it names the input by its path: told by its name (video.mp4), not our folders
        log.warning("a stage could not decode an input: %s", cause)
        message = OUR_FOLDERS.sub("", str(cause))
        return InputError(422, "audio" if message.startswith("audio") else "video", message)
    log.error("request failed", exc_info=err)
    return InputError(500, "", "internal error")


@serve.deployment
class PrepareDeployment:
    """Serve wrapper of Prepare: one chunk per call."""

    def __init__(self, pipeline: dict):
        self.cfg = LipSyncConfig.model_validate(pipeline)
        self.stage = set_up(Prepare, self.cfg)
        self.inputs = storage.InputCache(InputPolicy(), keep=8)  # inputs shipped by the ingress, not URLs
        self.plans: dict[str, Any] = {}

    def ready(self) -> bool:
        return True

    def prepare(
        self, video: tuple[str, str, bytes], audio: tuple[str, str, bytes], chunk: int, params: dict, speaker=None,
    ) -> PreparedChunk:
        """`speaker`: the box face="speaker" starts from, found once by the ingress (`stages.find_speaker`)."""
        cfg = self.cfg.with_params(params)
        paths = [self.inputs.put(*item) for item in (video, audio)]
        key = (video[1], audio[1], cfg.length)
        plan = self.plans.get(key)
        if plan is None:  # chunks of a request arrive together; other threads may be on other requests
            plan = plan_video(*paths, cfg)
            self.plans = dict([*list(self.plans.items())[-3:], (key, plan)])
        plan = plan if speaker is None else replace(plan, speaker=speaker)
        return self.stage(plan, plan.chunks[chunk], cfg)


@serve.deployment
class GenerateDeployment:
    """Serve wrapper of Generate: latent diffusion for one chunk per call."""

    def __init__(self, pipeline: dict):
        self.cfg = LipSyncConfig.model_validate(pipeline)
        self.stage = set_up(Generate, self.cfg)

    def ready(self) -> bool:
        return True

    def generate(self, item: PreparedChunk, params: dict) -> PreparedChunk:
        return self.stage(item, self.cfg.with_params(params))


@dataclass
class Job:
    id: str
    status: str = "queued"  # queued | running | done | failed
    frames_done: int = 0
    frames_total: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    error: dict | None = None
    result: str | None = None  # a local path, or a URL when output_prefix is set
    created: float = field(default_factory=time.time)


class JobStore:
    """The async jobs of one ingress replica, their folders under `work`, and the tasks that run them. Finished
    jobs and their files are kept for `keep_s`."""

    def __init__(self, work: Path, keep_s: float = 3600):
        self.work, self.keep_s = work, keep_s
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()

    def new(self) -> Job:
        self._expire()
        job = Job(uuid.uuid4().hex)
        (self.work / job.id).mkdir()
        return job

    def start(self, job: Job, work) -> None:
        """Keep `job` and run the coroutine `work` for it in the background."""
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise InputError(404, "id", f"no job {job_id}")
        return self.jobs[job_id]

    def _expire(self) -> None:
        now = time.time()
        for job in [j for j in self.jobs.values() if j.status in ("done", "failed") and now - j.created > self.keep_s]:
            shutil.rmtree(self.work / job.id, ignore_errors=True)
            del self.jobs[job.id]


api = FastAPI(title="lipsync-ray", description="Lip-sync a talking-head clip to new audio (LatentSync on Ray Serve).")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query")]
    return _error(422, ".".join(loc) or "body", first.get("msg", "invalid request"))


def _answers_errors(route: str):
    """A route whose failures become JSON errors (`_input_error`), counted in the request metrics."""

    def decorate(method):
        @functools.wraps(method)
        async def answer(self, *args, **kwargs):
            try:
                return await method(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure is answered
                failure = _input_error(err)
                self.requests.inc(tags={"route": route, "status": str(failure.status)})
                retry = {"Retry-After": str(self.config.retry_after_s)} if failure.status == 503 else None
                return _error(failure.status, failure.field, failure.message, retry)

        return answer

    return decorate


@contextmanager
def _removed_on_failure(folder: Path, answering: set[Path] | None = None):
    """A request's folder, removed (and from `answering`) when the request fails or is cancelled (the client went
    away)."""
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        if answering is not None:
            answering.discard(folder)
        raise


def _shipment(path: str) -> tuple[str, str, bytes]:
    """(file name, digest, bytes): what a Prepare replica on any node needs to recreate the input."""
    data = Path(path).read_bytes()
    return Path(path).name, hashlib.sha1(data).hexdigest()[:16], data


# Serve pickles the deployment classes when they are decorated: everything they use is defined above them.
@serve.deployment
@serve.ingress(api)
class LipSyncAPI:
    """The routes. Inputs arrive through `receive.RequestInputs`, async jobs live in a `JobStore`, and the work
    fans out to the Prepare and Generate deployments and comes back to Compose here."""

    def __init__(self, config: dict, prepare, generate):
        self.config = ServeConfig.model_validate(config)
        key = self.config.api_key.get_secret_value() if self.config.api_key else os.environ.get("LIPSYNC_API_KEY")
        self.api_key = key.encode() if key else None
        self.prepare, self.generate = prepare, generate
        self.work = Path(tempfile.mkdtemp(prefix="lipsync-requests-", dir=self.config.work_dir))
        self.inputs = RequestInputs(self.config)
        self.jobs = JobStore(self.work)
        self.compose = set_up(Compose, self.config.pipeline, device=compose_device(self.config.pipeline))
        self.page = {name: (resources.files("lipsync_ray") / "static" / name).read_text() for name in PAGE_FILES}
        self.requests = Counter("lipsync_requests", "HTTP requests by route and status", tag_keys=("route", "status"))
        self.latency = Histogram(
            "lipsync_request_seconds", "request latency", boundaries=[1, 2, 5, 10, 30, 60, 120, 300, 600], tag_keys=("route",)
        )
        self.fps = Histogram("lipsync_frames_per_second", "output frames per second of a request", boundaries=[1, 2, 5, 10, 20, 40, 80, 160])
        self.draining = False  # the service is stopping (`drain`)
        self.answering: set[Path] = set()  # the folders of the sync requests not yet answered in full

    # --- probes -----------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(asyncio.gather(self.prepare.ready.remote(), self.generate.ready.remote()), timeout=5)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    # --- the web page -----------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_index(self, request: Request) -> HTMLResponse:
        """The web page; its links resolve below the app's route prefix (`serve run` / `deploy` may set one)."""
        root = html.escape(request.scope.get("root_path", "").rstrip("/") + "/")
        return HTMLResponse(self.page["index.html"].replace('<base href="/">', f'<base href="{root}">'), headers=PAGE_HEADERS)

    @api.get("/static/{name}", include_in_schema=False)
    @_answers_errors("static")
    async def page_file(self, name: str):
        if name not in PAGE_FILES:
            raise InputError(404, "name", "no such file")
        return Response(self.page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @api.get("/v1/options")
    @_answers_errors("options")
    async def options(self, request: Request):
        """The per-request parameters (name -> JSON schema with this service's default) and the service's limits."""
        self._authorise(request)
        config = self.config
        return {"params": self.inputs.options(), "model": config.pipeline.model, "max_upload_bytes": config.max_upload_bytes,
                "max_sync_seconds": config.max_sync_seconds, "max_job_seconds": config.max_job_seconds}

    # --- sync -------------------------------------------------------------------------------------------
    @api.post(
        "/v1/lipsync", response_class=FileResponse, responses={200: {"content": {"video/mp4": {}}}},
        openapi_extra=RequestInputs.openapi(),
    )
    @_answers_errors("lipsync")
    async def lipsync(self, request: Request):
        """Multipart `video` and `audio` files, or JSON `video_url` and `audio_url`; optional parameters (form
        fields or JSON) as listed by GET /v1/options. Returns the lip-synced mp4."""
        start = time.perf_counter()
        self._authorise(request)
        self._admit()
        folder = self.work / uuid.uuid4().hex
        folder.mkdir()
        self.answering.add(folder)
        with _removed_on_failure(folder, self.answering):
            video, audio, params = await self.inputs(request, folder)
            out = folder / "out.mp4"
            frames = await self._run(video, audio, params, out, self.config.max_sync_seconds, None)
        seconds = time.perf_counter() - start
        self.requests.inc(tags={"route": "lipsync", "status": "200"})
        self.latency.observe(seconds, tags={"route": "lipsync"})
        self.fps.observe(frames / seconds)
        return FileResponse(
            out, media_type="video/mp4", filename="lipsync.mp4",
            headers={"X-Frames": str(frames), "X-Seconds": f"{seconds:.2f}"},
            background=BackgroundTask(self._answered, folder),
        )

    def _answered(self, folder: Path) -> None:
        """After the mp4 was sent."""
        shutil.rmtree(folder, ignore_errors=True)
        self.answering.discard(folder)

    def _admit(self) -> None:
        if self.draining:
            raise InputError(503, "", "the service is stopping, try again")

    async def drain(self, timeout_s: float) -> int:
        """Before the service stops: new requests get 503 and the sync requests in flight get up to `timeout_s` to
        be answered in full (async jobs in flight are lost with the replica). Returns how many were not."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.answering and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return len(self.answering)

    # --- async ------------------------------------------------------------------------------------------
    @api.post("/v1/jobs", status_code=202, openapi_extra=RequestInputs.openapi())
    @_answers_errors("jobs")
    async def submit(self, request: Request):
        """Same inputs as /v1/lipsync, for clips up to `max_job_seconds`; returns {"id": ...} at once."""
        self._authorise(request)
        self._admit()
        job = self.jobs.new()
        with _removed_on_failure(self.work / job.id) as folder:
            video, audio, params = await self.inputs(request, folder)
            cfg = self.config.pipeline.with_params(params)
            plan = await asyncio.to_thread(self._check_media, video, audio, self.config.max_job_seconds, cfg)
        self.jobs.start(job, self._job(job, video, audio, params, folder, plan))
        self.requests.inc(tags={"route": "jobs", "status": "202"})
        return {"id": job.id, "status": job.status}

    @api.get("/v1/jobs/{job_id}")
    @_answers_errors("job_status")
    async def job_status(self, job_id: str, request: Request):
        self._authorise(request)
        job = self.jobs.get(job_id)
        # a step per chunk generated, and one for composing (pasting back and encoding) the whole video
        composed = job.frames_done / job.frames_total if job.frames_total else 0.0
        progress = (job.chunks_done + composed) / (job.chunks_total + 1)
        return {"id": job.id, "status": job.status, "progress": round(progress, 3), "frames": job.frames_total, "error": job.error}

    @api.get("/v1/jobs/{job_id}/result", response_model=None)
    @_answers_errors("job_result")
    async def job_result(self, job_id: str, request: Request):
        self._authorise(request)
        job = self.jobs.get(job_id)
        if job.status != "done":
            return JSONResponse({"id": job.id, "status": job.status, "error": job.error}, status_code=409 if job.status != "failed" else 422)
        if self.config.output_prefix:
            return {"id": job.id, "url": job.result}
        return FileResponse(job.result, media_type="video/mp4", filename=f"{job.id}.mp4")

    async def _job(self, job: Job, video: str, audio: str, params: dict, folder: Path, plan=None) -> None:
        job.status = "running"
        try:
            out = folder / "out.mp4"
            await self._run(video, audio, params, out, self.config.max_job_seconds, job, plan)
            if self.config.output_prefix:
                url = storage.join(self.config.output_prefix, f"{job.id}.mp4")
                await asyncio.to_thread(storage.upload_atomic, out, url, self.config.storage_options)
                job.result = url
                shutil.rmtree(folder, ignore_errors=True)
            else:
                job.result = str(out)
            job.status = "done"
        except Exception as err:  # noqa: BLE001 - the job fails, the replica lives on
            failure = _input_error(err)
            job.status, job.error = "failed", {"field": failure.field, "message": failure.message}
            shutil.rmtree(folder, ignore_errors=True)

    # --- the work ---------------------------------------------------------------------------------------
    async def _run(self, video: str, audio: str, params: dict, out: Path, max_seconds: float, job: Job | None, plan=None) -> int:
        """`plan`: the inputs' plan where the route has made it already (`_check_media`)."""
        cfg = self.config.pipeline.with_params(params)
        if plan is None:
            plan = await asyncio.to_thread(self._check_media, video, audio, max_seconds, cfg)
        plan = await asyncio.to_thread(find_speaker, plan, cfg)  # face="speaker": scored once, here
        if job:
            job.frames_total, job.chunks_total = plan.n_out, len(plan.chunks)
        shipped = (await asyncio.to_thread(_shipment, video), await asyncio.to_thread(_shipment, audio))

        async def one(index: int) -> PreparedChunk:
            prepared = await self.prepare.prepare.remote(*shipped, index, params, plan.speaker)
            generated = await self.generate.generate.remote(prepared, params)
            if job:
                job.chunks_done += 1
            return generated

        items = await asyncio.gather(*(one(c.index) for c in plan.chunks))
        if not any(item.flags.any() for item in items) and cfg.on_no_face == "error":
            raise InputError(422, "video", f"{Path(video).name}: no face found in any frame")

        def progress(n: int) -> None:
            if job:
                job.frames_done += n

        try:
            return await asyncio.to_thread(self.compose, plan, items, out, progress, cfg)
        except MediaError as err:  # a stream that probes fine but does not decode
            raise InputError(422, "video", str(err).replace(str(Path(video).parent) + "/", "")) from None

    def _check_media(self, video: str, audio: str, max_seconds: float, cfg: LipSyncConfig | None = None):
        folder = str(Path(video).parent) + "/"  # errors name the input (video.mp4), not our folders
        try:
            info = probe_video(video)
        except MediaError as err:
            raise InputError(422, "video", str(err).replace(folder, "")) from None
        try:  # the limits (video size, audio no longer than any job) are checked on the probes, before decoding
            plan = plan_video(
                video, audio, cfg or self.config.pipeline, limits=self.config.inputs,
                max_seconds=self.config.max_job_seconds, info=info,
            )
        except storage.InputRefused as err:
            raise type(err)(err.field, err.message.replace(folder, "")) from None
        except MediaError as err:
            raise InputError(422, "audio", str(err).replace(folder, "")) from None
        if plan.n_out / 25 > max_seconds:
            raise InputError(413, "audio", f"{plan.n_out / 25:.1f} s of output is longer than the {max_seconds:.0f} s allowed here")
        return plan

    def _authorise(self, request: Request) -> None:
        """The key is compared in constant time and never repeated in answers or logs."""
        if self.api_key and not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), self.api_key):
            raise InputError(401, "X-API-Key", "missing or wrong API key")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run/deploy`, KubeRay's RayService and `lipsync-ray serve`."""
    config = ServeConfig.model_validate(args or {})
    check_weights(config.pipeline)  # the service's own optional models: missing weights fail the deployment here
    restoring = config.pipeline.enhance != "none"  # the ingress restores faces on a share of a GPU
    pipeline = config.pipeline.model_dump()

    def autoscaling(replicas: tuple[int, int]) -> dict:
        return {"min_replicas": replicas[0], "max_replicas": replicas[1], "target_ongoing_requests": 2}

    prepare = PrepareDeployment.options(
        autoscaling_config=autoscaling(config.prepare_replicas), max_ongoing_requests=4, ray_actor_options=ray_resources(Prepare)
    ).bind(pipeline)
    generate = GenerateDeployment.options(
        autoscaling_config=autoscaling(config.generate_replicas), max_ongoing_requests=2,
        ray_actor_options=ray_resources(Generate, config.gpu, restoring),
    ).bind(pipeline)
    return LipSyncAPI.options(
        max_ongoing_requests=config.max_ongoing_requests, max_queued_requests=config.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry_after_s},
        ray_actor_options=ray_resources(Compose, config.gpu, restoring),  # the ingress composes the results
    ).bind(config.model_dump(), prepare, generate)
