"""The Ray Serve app over real HTTP on 127.0.0.1, with tiny-random on a local Ray cluster."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import httpx
import numpy as np
import pytest

from lipsync_ray.media import FrameReader, probe_video

from .conftest import DATA, cli_run_like_a_ray_worker, ffmpeg

TINY = {"model": "tiny-random", "steps": 1, "detector": "offline"}
KEY = "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_media")
    ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "1.6", "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(d / "v.mp4"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "1.6", str(d / "a.wav"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "4", str(d / "long.wav"))
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "1", str(d / "silent.wav"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=160x120:r=25", "-t", "1", "-c:v", "libx264", str(d / "blank.mp4"))
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    (d / "big.mp4").write_bytes(os.urandom(3_200_000))
    return d


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    """Two apps: an open one, and a deliberately small one behind an API key (1 request at a time, 2 queued)."""
    from ray import serve

    from lipsync_ray.serve import build_app

    port = _free_port()
    work = {name: tmp_path_factory.mktemp(f"work_{name}") for name in ("open", "secured")}
    common = {"pipeline": TINY, "gpu": False, "max_sync_seconds": 3, "max_job_seconds": 10, "max_upload_bytes": 3_000_000,
              "prepare_replicas": (1, 1), "generate_replicas": (1, 1), "retry_after_s": 2}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({**common, "work_dir": str(work["open"])}), name="open", route_prefix="/", blocking=False)
    serve.run(
        build_app({**common, "work_dir": str(work["secured"]), "api_key": KEY, "max_ongoing_requests": 1, "max_queued_requests": 2}),
        name="secured", route_prefix="/secured", blocking=False,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        if all(httpx.get(f"{base}{p}/readyz", timeout=10).status_code == 200 for p in ("", "/secured")):
            break
        time.sleep(1)
    yield base, work
    serve.shutdown()


def _files(media, video="v.mp4", audio="a.wav"):
    return {"video": (video, (media / video).read_bytes(), "video/mp4"), "audio": (audio, (media / audio).read_bytes(), "audio/wav")}


def test_sync_request_gives_the_frames_of_the_cli(service, media, tmp_path):
    base, work = service
    response = httpx.post(f"{base}/v1/lipsync", files=_files(media), data={"seed": "7"}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4" and response.headers["x-frames"] == "40"
    served = tmp_path / "served.mp4"
    served.write_bytes(response.content)
    info = probe_video(served)
    assert (info.fps, info.frames, info.width, info.height, info.has_audio) == (25, 40, 270, 480, True)
    local = tmp_path / "cli.mp4"
    cli_run_like_a_ray_worker(str(media / "v.mp4"), str(media / "a.wav"), "-o", str(local), "--seed", "7", "--model", "tiny-random", "--steps", "1", "--detector", "offline")
    with FrameReader(served) as a, FrameReader(local) as b:
        for i in range(40):
            np.testing.assert_array_equal(a[i], b[i])
    assert list(work["open"].iterdir()) == [next(work["open"].iterdir())] and not any(next(work["open"].iterdir()).iterdir())


def test_async_job_from_bucket_urls(service, media, tmp_path):
    base, _ = service
    fs = fsspec.filesystem("s3")
    fs.mkdir("clips")
    for name in ("v.mp4", "a.wav"):
        fs.put_file(str(media / name), f"clips/{name}")
    submitted = httpx.post(f"{base}/v1/jobs", json={"video_url": "s3://clips/v.mp4", "audio_url": "s3://clips/a.wav", "steps": 2}, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    assert httpx.get(f"{base}/v1/jobs/{job}/result", timeout=10).status_code in (409, 200)
    for _ in range(240):
        status = httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert status["status"] == "done" and status["progress"] == 1.0 and status["frames"] == 40, status
    result = httpx.get(f"{base}/v1/jobs/{job}/result", timeout=60)
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    (tmp_path / "job.mp4").write_bytes(result.content)
    assert probe_video(tmp_path / "job.mp4").frames == 40
    assert httpx.get(f"{base}/v1/jobs/nope", timeout=10).status_code == 404


@pytest.mark.parametrize(
    "files, data, status, field, words",
    [
        (("corrupt.mp4", "a.wav"), {}, 422, "video", "corrupt.mp4"),
        (("a.wav", "a.wav"), {}, 422, "video", "no video stream"),
        (("blank.mp4", "a.wav"), {}, 422, "video", "no face"),
        (("v.mp4", "silent.wav"), {}, 422, "audio", "silent"),
        (("v.mp4", "long.wav"), {}, 413, "audio", "longer than"),
        (("big.mp4", "a.wav"), {}, 413, "video", "bytes"),
        (("v.mp4", None), {}, 422, "audio", "missing"),
        (("v.mp4", "a.wav"), {"steps": "0"}, 422, "steps", "greater than"),
        (("v.mp4", "a.wav"), {"colour": "red"}, 422, "colour", "unknown"),
    ],
)
def test_bad_uploads_answer_4xx_naming_the_field(service, media, files, data, status, field, words):
    base, work = service
    video, audio = files
    parts = {"video": (video, (media / video).read_bytes())}
    if audio:
        parts["audio"] = (audio, (media / audio).read_bytes())
    response = httpx.post(f"{base}/v1/lipsync", files=parts, data=data, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and words in error["message"], error


@pytest.mark.parametrize(
    "body, field",
    [
        ({"video_url": "s3://clips/nope.mp4", "audio_url": "s3://clips/a.wav"}, "video_url"),
        ({"video_url": "nonsense://x/y.mp4", "audio_url": "s3://clips/a.wav"}, "video_url"),
        ({"video_url": "/etc/passwd", "audio_url": "s3://clips/a.wav"}, "video_url"),
        ({"audio_url": "s3://clips/a.wav"}, "video_url"),
    ],
)
def test_bad_urls_answer_422(service, body, field):
    base, _ = service
    response = httpx.post(f"{base}/v1/jobs", json=body, timeout=60)
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_api_key(service, media):
    base, _ = service
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = httpx.post(f"{base}/secured/v1/lipsync", files=_files(media), headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["field"] == "X-API-Key"
    assert httpx.get(f"{base}/secured/healthz", timeout=10).status_code == 200  # probes stay open


def test_overload_answers_503_and_the_service_stays_healthy(service, media):
    base, work = service
    files = _files(media)

    def call(_):
        return httpx.post(f"{base}/secured/v1/lipsync", files=files, headers={"X-API-Key": KEY}, timeout=300)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(call, range(10)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)
    assert all(r.headers["x-frames"] == "40" for r in responses if r.status_code == 200)
    assert httpx.get(f"{base}/secured/readyz", timeout=30).status_code == 200
    for _ in range(20):  # each response removes its folder once sent
        left = [f for f in work["secured"].rglob("*") if f.is_file()]
        if not left:
            break
        time.sleep(0.5)
    assert not left


def test_cli_serve_starts_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lipsync_ray.cli", "serve", "--model", "tiny-random", "--detector", "offline", "--no-gpu", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        for _ in range(240):  # the command says when it serves
            if any("lipsync-ray serving on" in line for line in lines):
                break
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    finally:
        proc.kill()
    time.sleep(0.5)
    assert any("stopping" in line for line in lines)
