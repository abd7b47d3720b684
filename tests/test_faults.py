"""Fault tolerance (issue 35): processes killed or stopped mid-job on a local Ray cluster, with tiny-random and real
media. A bulk job whose Prepare or Generate actor is killed, or whose driver is killed and rerun, ends with the
frames of an undisturbed run; Serve answers the requests a dying replica or a SIGTERM catches with a result or a
retryable error."""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from lipsync_ray.batch import BatchConfig, run_batch
from lipsync_ray.catalog import read_manifest
from lipsync_ray.config import LipSyncConfig

from .conftest import DATA, ffmpeg, free_port, serve_apps

PIPELINE = dict(model="tiny-random", steps=1, detector="offline", windows_per_chunk=1)
VIDEOS = ("one", "two")
# the bulk job's options as `lipsync-ray batch` takes them: the config of `_job`, so the frames of its reference run
CLI_OPTIONS = [
    "--model", "tiny-random", "--steps", "1", "--detector", "offline", "--windows-per-chunk", "1",
    "--prepare-actors", "1,1", "--generate-actors", "1,1", "--chunks-per-batch", "1", "--chunks-per-prepare", "2",
]
DUMPS = ("Fatal Python error", "Aborted", "Segmentation fault", "Traceback", "*** SIG", "core dumped")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two 2 s clips of four chunks each; the second row takes three steps, so that a job spends a while on the
    second video's chunks after the first video is written, and can be caught there."""
    d = tmp_path_factory.mktemp("fault_media")
    for src, name in (("demo1", "one"), ("demo2", "two")):
        ffmpeg("-i", str(DATA / f"{src}_video.mp4"), "-t", "2", "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(d / f"{name}.mp4"))
        ffmpeg("-i", str(DATA / f"{src}_audio.wav"), "-t", "2", str(d / f"{name}.wav"))
    (d / "catalog.csv").write_text("id,video,audio,steps\n" + "".join(f"{n},{d / n}.mp4,{d / n}.wav,{1 + 2 * i}\n" for i, n in enumerate(VIDEOS)))
    return d


def _job(media, out) -> BatchConfig:
    return BatchConfig(
        catalog=str(media / "catalog.csv"), output=str(out), pipeline=LipSyncConfig(**PIPELINE),
        prepare_actors=(1, 1), generate_actors=(1, 1), chunks_per_batch=1, chunks_per_prepare=2,
    )


def framemd5(path) -> list[str]:
    """The md5 of each decoded video frame (ffmpeg's framemd5, without its header)."""
    run = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-map", "0:v", "-f", "framemd5", "-"], capture_output=True, text=True, check=True)
    return [line.rsplit(",", 1)[1].strip() for line in run.stdout.splitlines() if not line.startswith("#")]


@pytest.fixture(scope="module")
def reference(ray_local, media, tmp_path_factory):
    """The frames of an undisturbed run."""
    out = tmp_path_factory.mktemp("reference")
    manifest = run_batch(_job(media, out))
    assert [m.status for m in manifest] == ["ok", "ok"], manifest
    return {v: framemd5(out / f"{v}.mp4") for v in VIDEOS}


def _staged(out: Path, video: str = "") -> list[Path]:
    return sorted((out / ".staging").glob(f"{video}*/chunk-*.npz"))


def _wait(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _pids(name: str) -> list[int]:
    """This test cluster's worker processes (below its raylet, a child of this process) whose title names `name`:
    Ray titles a worker `ray::<actor class or task>...`."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if cmdline.startswith("ray::") and name in cmdline:
            found.append(p.pid)
    return found


def _assert_same_outputs(out: Path, reference: dict) -> None:
    for v in VIDEOS:
        frames = framemd5(out / f"{v}.mp4")
        differ = [i for i, (a, b) in enumerate(zip(frames, reference[v])) if a != b]
        assert len(frames) == len(reference[v]) and not differ, f"{v}: frames {differ} differ from an undisturbed run's"


def _listing(out: Path) -> list[str]:
    """Every file under the output prefix, relative to it."""
    return sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())


@pytest.mark.parametrize("actor", ["GenerateActor", "PrepareActor"])
def test_a_killed_actor_loses_nothing(ray_local, media, reference, actor, tmp_path):
    """SIGKILL to the job's only Generate actor once the driver has a generated chunk (or to its only Prepare actor
    during one of its calls): the actor is restarted, its calls retried, and every video ends ok with the frames of
    an undisturbed run."""
    out = tmp_path / "out"
    heard = []  # chunk rows as they leave the GPU stage: a staged chunk may be redone if its call had not returned
    # Prepare may finish every run before the first chunk leaves Generate, and its actor is gone then
    due = (lambda: heard) if actor == "GenerateActor" else (lambda: _pids(f"{actor})).submit"))
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_batch, _job(media, out), on_chunk=heard.append)
        _wait(lambda: due() or job.done(), what=f"{actor}'s moment")
        _wait(lambda: _pids(actor) or job.done(), what=actor)
        assert not job.done() and not (out / "two.mp4").exists(), "the job finished before the kill"
        (pid,) = _pids(actor)
        os.kill(pid, signal.SIGKILL)
        assert len(heard) < 8, "every chunk was generated before the kill"
        manifest = {m.id: m for m in job.result(timeout=600)}
    assert {v: m.status for v, m in manifest.items()} == {"one": "ok", "two": "ok"}, manifest
    if actor == "GenerateActor":  # the chunks after the kill were generated by another process
        assert len(set().union(*(m.workers for m in manifest.values()))) >= 2, manifest
    _assert_same_outputs(out, reference)
    assert _listing(out) == ["manifest.parquet", "one.mp4", "two.mp4"]


def _batch_cli(media, out, address=None) -> dict:
    """`lipsync-ray batch` over the media's catalog as subprocess arguments; on the given cluster, else on a Ray
    it starts itself."""
    args = [sys.executable, "-m", "lipsync_ray.cli", "batch", "--catalog", str(media / "catalog.csv"), "--output", str(out), *CLI_OPTIONS]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(args=[*args, *(["--address", address] if address else [])], env=env, text=True)


def _finished_and_staged(out: Path) -> tuple[list[str], dict[str, int]]:
    """The videos whose output is written, and the staged chunks of the others."""
    finished = [v for v in VIDEOS if (out / f"{v}.mp4").exists()]
    return finished, {v: len(_staged(out, v)) for v in VIDEOS if v not in finished}


def _killed_mid_job(out: Path) -> bool:
    finished, staged = _finished_and_staged(out)
    return bool(finished) and any(staged.values())


def _assert_resumed(out: Path, reference: dict, finished: list[str], staged: dict[str, int]) -> None:
    """The rerun's manifest skips the videos finished before, reuses the staged chunks of the others, and the
    output prefix holds the finished outputs and the manifest only."""
    manifest = read_manifest(str(out / "manifest.parquet")).set_index("id")
    assert list(manifest.index) == list(VIDEOS)
    for v in VIDEOS:
        assert manifest.loc[v, "status"] == ("skipped" if v in finished else "ok"), manifest
        if v in staged:
            assert (manifest.loc[v, "chunks_reused"], manifest.loc[v, "chunks"]) == (staged[v], 4), manifest
    _assert_same_outputs(out, reference)
    assert _listing(out) == ["manifest.parquet", "one.mp4", "two.mp4"]  # no partial, temporary or staged objects left


@pytest.mark.slow  # two runs of the job from the command line: over a minute on 2 cores
def test_a_killed_driver_resumes_where_it_stopped(ray_local, media, reference, tmp_path):
    """SIGKILL to `lipsync-ray batch` once a video is written and another has chunks staged; the same command
    again skips the finished video, reuses the other's staged chunks, and leaves only the finished outputs."""
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    driver = subprocess.Popen(**_batch_cli(media, out, address), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _killed_mid_job(out) or driver.poll() is not None, what="a finished video")
        assert driver.poll() is None, "the job finished before the kill"
        driver.kill()
        driver.wait()
    finally:
        driver.kill()
    # Ray ends the tasks and actors of a driver that died; then nothing changes under the output prefix
    _wait(lambda: not _pids("Actor)") and not _pids("compose_task"), timeout=60, what="the killed driver's workers to end")
    finished, staged = _finished_and_staged(out)
    assert finished and any(staged.values()) and not (out / "manifest.parquet").exists(), (finished, staged)
    rerun = subprocess.run(**_batch_cli(media, out, address), capture_output=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_resumed(out, reference, finished, staged)


@pytest.mark.slow  # a job on a Ray of its own, and its rerun: over a minute on 2 cores
def test_sigterm_stops_the_driver_and_the_next_run_resumes(ray_local, media, reference, tmp_path):
    """SIGTERM to `lipsync-ray batch` (on the Ray it starts itself) once a chunk is staged: it exits 143 within
    30 s with a one-line message, no stack dump, and the next run reuses the staged chunks."""
    out = tmp_path / "out"
    driver = subprocess.Popen(**_batch_cli(media, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _staged(out) or driver.poll() is not None, what="a staged chunk")
        assert driver.poll() is None and not (out / "two.mp4").exists(), "the job finished before the signal"
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=30)
    finally:
        driver.kill()
    assert driver.returncode == 143, stderr[-3000:]
    assert "interrupted: finished videos and staged chunks are kept" in stderr
    assert not [d for d in DUMPS if d in stderr], stderr[-3000:]
    finished, staged = _finished_and_staged(out)
    assert any(staged.values()) and not (out / "manifest.parquet").exists()
    rerun = subprocess.run(**_batch_cli(media, out, ray_local.get_runtime_context().gcs_address), capture_output=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_resumed(out, reference, finished, staged)


SERVE_PIPELINE = {**PIPELINE, "score_model": "tiny-random"}


def _post(base: str, media: Path, path: str = "/v1/lipsync") -> httpx.Response:
    files = {"video": ("v.mp4", (media / "one.mp4").read_bytes()), "audio": ("a.wav", (media / "one.wav").read_bytes())}
    return httpx.post(f"{base}{path}", files=files, timeout=300)


def _assert_result_or_retry(response: httpx.Response, expected: list[str], tmp_path: Path) -> None:
    """A finished mp4 with the expected frames, or 503 with Retry-After and a JSON error."""
    if response.status_code == 503:
        assert response.headers.get("retry-after") and list(response.json()) == ["error"], response.text
        return
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4", response.text[:2000]
    served = tmp_path / f"served-{id(response)}.mp4"
    served.write_bytes(response.content)
    assert framemd5(served) == expected


def _ready(base: str) -> bool:
    """The service answers /readyz (while Serve replaces the ingress, the proxy may hold the request)."""
    try:
        return httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    except httpx.TimeoutException:
        return False


def _job_generating(base: str, job: str) -> bool:
    status = httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()
    assert status["status"] in ("queued", "running"), status
    return status["progress"] > 0


@pytest.mark.slow  # a Serve app and five requests: over a minute on 2 cores
@pytest.mark.parametrize("replica", ["GenerateDeployment", "LipSyncAPI"])
def test_a_killed_replica_answers_with_results_or_retryable_errors(ray_local, media, replica, tmp_path):
    """SIGKILL to the only Generate replica, or to the ingress replica itself, while requests are in flight: every
    client gets its mp4 or a 503 JSON error to retry, never a broken file or a bare 500 (for the ingress, Serve's
    proxy answers, through `serve.LostRequestsAreRetryable`, which the `ray_local` fixture names in the environment
    as the cluster configs do), and the service answers again once Serve has replaced the replica."""
    config = {"pipeline": SERVE_PIPELINE, "gpu": False, "prepare_replicas": (1, 1), "generate_replicas": (1, 1), "retry_after_s": 2}
    with serve_apps({"app": ("/", config)}) as base:
        first = _post(base, media)
        assert first.status_code == 200, first.text
        (tmp_path / "first.mp4").write_bytes(first.content)
        expected = framemd5(tmp_path / "first.mp4")
        job = _post(base, media, "/v1/jobs").json()["id"]  # its progress shows when chunks are being generated
        with ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(_post, base, media) for _ in range(3)]  # their chunks queue behind the job's
            _wait(lambda: _job_generating(base, job), timeout=120, what="generation")
            assert not any(c.done() for c in calls)
            (pid,) = _pids(replica)
            os.kill(pid, signal.SIGKILL)
            responses = [c.result() for c in calls]
        for response in responses:
            _assert_result_or_retry(response, expected, tmp_path)
        if replica == "LipSyncAPI":  # the requests it held (and the job) are lost with it
            assert any(r.status_code == 503 for r in responses), [r.status_code for r in responses]
        else:
            _wait(lambda: httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()["status"] in ("done", "failed"), what="the job")
            status = httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()
            assert status["status"] == "done" or status["error"]["message"] == "temporarily unavailable, try again", status
        _wait(lambda: _ready(base), timeout=120, what="the replaced replica")
        again = _post(base, media)
        _assert_result_or_retry(again, expected, tmp_path)
        assert again.status_code == 200


@pytest.mark.slow  # `lipsync-ray serve` on a Ray of its own: over a minute on 2 cores
def test_sigterm_to_serve_finishes_or_refuses_requests_in_flight(tmp_path, media):
    """SIGTERM to `lipsync-ray serve` (what Kubernetes sends) while requests are being generated: each is answered
    (its mp4, or 503), and the command exits 0 within 30 s without a native stack dump."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lipsync_ray.cli", "serve", "--model", "tiny-random", "--steps", "1", "--detector", "offline", "--no-gpu", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: any("lipsync-ray serving on" in line for line in lines) or proc.poll() is not None, timeout=240, what="serving")
        assert proc.poll() is None, "".join(lines)[-3000:]
        _wait(lambda: httpx.get(f"{base}/readyz", timeout=30).status_code == 200, timeout=120, what="ready")
        job = _post(base, media, "/v1/jobs").json()["id"]  # its progress shows when chunks are being generated
        with ThreadPoolExecutor(3) as pool:
            # their chunks queue behind the job's (Serve may add a Generate replica meanwhile: three, so some are left)
            calls = [pool.submit(_post, base, media) for _ in range(3)]
            _wait(lambda: _job_generating(base, job), timeout=120, what="generation")
            assert not all(c.done() for c in calls)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            responses = [c.result() for c in calls]
            code = proc.wait(timeout=30)
            seconds = time.monotonic() - start
    finally:
        proc.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 0 and seconds < 30, output[-3000:]
    for i, response in enumerate(responses):
        assert response.status_code in (200, 503), response.text[:2000]
        if response.status_code == 200:
            (tmp_path / f"out{i}.mp4").write_bytes(response.content)
            assert len(framemd5(tmp_path / f"out{i}.mp4")) == 50
    assert "stopping" in output and not [d for d in DUMPS if d in output], output[-3000:]
