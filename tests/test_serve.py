"""The Ray Serve app over real HTTP on 127.0.0.1, with tiny-random on a local Ray cluster."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

import fsspec
import httpx
import numpy as np
import pytest

from lipsync_ray.config import LipSyncConfig, ServeConfig
from lipsync_ray.media import FrameReader, probe_video
from lipsync_ray.receive import InputError, RequestInputs

from .conftest import DATA, cli_run_like_a_ray_worker, ffmpeg, free_port, loopback_http, serve_apps

TINY = {"model": "tiny-random", "steps": 1, "detector": "offline", "score_model": "tiny-random"}
KEY = "s3cret-7f3a9c21"
UPLOAD_LIMIT = 3_000_000
INPUT_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_media")
    for seconds, name in ((1.6, ""), (2, "2"), (3, "3")):
        ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", str(seconds), "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(d / f"v{name}.mp4"))
    ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "0.2", "-vf", "scale=480:480", "-c:v", "libx264", "-an", str(d / "square.mp4"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "1.6", str(d / "a.wav"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "2", str(d / "a2.wav"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "4", str(d / "long.wav"))
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "1", str(d / "silent.wav"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=160x120:r=25", "-t", "1", "-c:v", "libx264", str(d / "blank.mp4"))
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    (d / "big.mp4").write_bytes(os.urandom(3_200_000))
    return d


@pytest.fixture(scope="module")
def site(media):
    """A plain HTTP server on 127.0.0.1 holding the media, which the open app is allowed to fetch from."""
    with loopback_http(media) as base:
        yield base


@pytest.fixture(scope="module")
def service(ray_local, site, tmp_path_factory):
    """Two apps: an open one (limits 4 + 8; plain http from the test's loopback server allowed, video limits of
    60 frames and 270x480), and a deliberately small one behind an API key (1 request at a time, 2 queued)."""
    work = {name: tmp_path_factory.mktemp(f"work_{name}") for name in ("open", "secured")}
    common = {"pipeline": TINY, "gpu": False, "max_sync_seconds": 3, "max_job_seconds": 10, "max_upload_bytes": UPLOAD_LIMIT,
              "input_timeout_s": INPUT_TIMEOUT_S, "prepare_replicas": (1, 1), "generate_replicas": (1, 1), "retry_after_s": 2}
    inputs = {"protocols": ["s3", "gs", "https", "http"], "allowed_hosts": [urlsplit(site).netloc], "max_video_frames": 60, "max_video_pixels": 270 * 480}
    with serve_apps({
        "open": ("/", {**common, "work_dir": str(work["open"]), "inputs": inputs}),
        "secured": ("/secured", {**common, "work_dir": str(work["secured"]), "api_key": KEY, "max_ongoing_requests": 1, "max_queued_requests": 2}),
    }) as base:
        yield base, work


def _files(media, video="v.mp4", audio="a.wav"):
    return {"video": (video, (media / video).read_bytes(), "video/mp4"), "audio": (audio, (media / audio).read_bytes(), "audio/wav")}


def test_sync_request_gives_the_frames_of_the_cli(service, media, tmp_path):
    base, work = service
    files = _files(media)
    files["video"] = ("../../../escaped.mp4", *files["video"][1:])  # a client's file name is never a path
    response = httpx.post(f"{base}/v1/lipsync", files=files, data={"seed": "7"}, timeout=300)
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
    assert not list(work["open"].parents[1].glob("**/escaped.mp4"))


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
        (("corrupt.mp4", "a.wav"), {}, 422, "video", "video.mp4: not a readable video"),
        (("a.wav", "a.wav"), {}, 422, "video", "no video stream"),
        (("blank.mp4", "a.wav"), {}, 422, "video", "no face"),
        (("v.mp4", "silent.wav"), {}, 422, "audio", "silent"),
        (("v.mp4", "long.wav"), {}, 413, "audio", "longer than"),
        (("big.mp4", "a.wav"), {}, 413, "video", "more than the 3000000 bytes allowed"),
        (("v3.mp4", "a.wav"), {}, 413, "video", "75 frames is more than the 60 allowed"),
        (("square.mp4", "a.wav"), {}, 413, "video", "480x480 is more than the 129600 pixels allowed"),
        (("v.mp4", None), {}, 422, "audio", "missing"),
        (("v.mp4", "a.wav"), {"steps": "0"}, 422, "steps", "greater than"),
        (("v.mp4", "a.wav"), {"colour": "red"}, 422, "colour", "unknown"),
        (("v.mp4", "a.wav"), {"length": "bounce"}, 422, "length", "'pingpong', 'loop', 'cut' or 'silence'"),
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


@pytest.mark.parametrize("video, audio, length, frames", [("v.mp4", "a2.wav", "cut", 40), ("v2.mp4", "a.wav", "silence", 50), ("v.mp4", "a2.wav", "loop", 50)])
def test_length_modes(service, media, video, audio, length, frames):
    base, _ = service
    response = httpx.post(f"{base}/v1/lipsync", files=_files(media, video, audio), data={"length": length, "deepcache": "2"}, timeout=300)
    assert response.status_code == 200 and response.headers["x-frames"] == str(frames), response.text


def test_options_list_the_request_parameters_with_the_service_defaults(service):
    base, _ = service
    options = httpx.get(f"{base}/v1/options", timeout=10).json()
    assert list(options["params"]) == list(RequestInputs.PARAMS)
    assert options["params"]["steps"] == {**LipSyncConfig.model_json_schema()["properties"]["steps"], "default": 1}
    assert options["params"]["length"]["enum"] == ["pingpong", "loop", "cut", "silence"]
    assert (options["model"], options["max_upload_bytes"], options["max_job_seconds"]) == ("tiny-random", UPLOAD_LIMIT, 10)
    assert httpx.get(f"{base}/secured/v1/options", timeout=10).status_code == 401
    assert httpx.get(f"{base}/secured/v1/options", headers={"X-API-Key": KEY}, timeout=10).status_code == 200


def test_the_web_page_and_its_files(service):
    base, _ = service
    for prefix in ("", "/secured"):  # the page needs no key; its links resolve below the app's prefix
        page = httpx.get(f"{base}{prefix}/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f'<base href="{prefix}/">' in page.text and "default-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            assert httpx.get(f"{base}{prefix}/static/{name}", timeout=10).headers["content-type"].startswith(kind)
    assert httpx.get(f"{base}/static/index.htm", timeout=10).json()["error"]["field"] == "name"
    for name in ("index.htm", "..%2Fserve.py", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "../../receive.py"):  # its own files only
        assert httpx.get(f"{base}/static/{name}", timeout=10).status_code == 404


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


def test_api_key(service, media, ray_local):
    base, _ = service
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "0"}):
        response = httpx.post(f"{base}/secured/v1/lipsync", files=_files(media), headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["field"] == "X-API-Key"
        assert KEY not in response.text and KEY[:-1] not in response.text
    assert httpx.get(f"{base}/secured/healthz", timeout=10).status_code == 200  # probes stay open
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    assert [f for f in logs.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()] == []  # never logged


# URLs that the open app must refuse before reaching them (`{site}`: the allowed loopback server, `{serve}`:
# this service's own port, `{port}`: the allowed server's port under other names)
REFUSED_URLS = [
    ("simplecache::file:///etc/passwd", "chained URLs"),
    ("file:///etc/passwd", "local paths are not accepted"),
    ("memory://x", "only s3://, gs://, https://, http:// URLs"),
    ("http://169.254.169.254/latest/meta-data", "the host is on a cloud metadata address"),
    ("http://127.0.0.1:{serve}/healthz", "the host is on a loopback address"),
    ("http://localhost:{port}/files/v.mp4", "the host is on a loopback address"),
    ("http://[::1]:{port}/files/v.mp4", "the host is on a loopback address"),
    ("{site}/redirect?to=http%3A//127.0.0.1%3A{serve}/healthz", "redirected to a location that is not accepted"),
    ("{site}/redirect?to=http%3A//localhost%3A{port}/files/v.mp4", "redirected to a location that is not accepted"),
]


@pytest.mark.parametrize("template, words", REFUSED_URLS)
def test_refused_urls_answer_422_naming_the_field(service, site, template, words):
    base, _ = service
    url = template.format(site=site, serve=urlsplit(base).port, port=urlsplit(site).port)
    response = httpx.post(f"{base}/v1/lipsync", json={"video_url": f"{site}/files/v.mp4", "audio_url": url}, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 422 and error["field"] == "audio_url" and error["message"].startswith(f"{url}: {words}"), response.text
    assert list(response.json()) == ["error"] and "Error" not in response.text and "127.0.0.1" not in error["message"].replace(url, "")


def test_urls_from_an_allowed_host_through_a_redirect(service, site):
    base, _ = service
    body = {"video_url": f"{site}/redirect?to={quote('/files/v.mp4')}", "audio_url": f"{site}/files/a.wav"}
    response = httpx.post(f"{base}/v1/lipsync", json=body, timeout=300)
    assert response.status_code == 200 and response.headers["x-frames"] == "40", response.text


def test_fetches_are_limited_while_they_stream(service, site):
    base, _ = service
    audio = f"{site}/files/a.wav"
    too_big = httpx.post(f"{base}/v1/lipsync", json={"video_url": f"{site}/stream?bytes=50000000", "audio_url": audio}, timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["field"] == "video_url", too_big.text
    start = time.monotonic()
    stalled = httpx.post(f"{base}/v1/lipsync", json={"video_url": f"{site}/stall", "audio_url": audio}, timeout=60)
    assert stalled.status_code == 408 and stalled.json()["error"]["field"] == "video_url", stalled.text
    assert INPUT_TIMEOUT_S <= time.monotonic() - start < INPUT_TIMEOUT_S + 10


def _raw_upload(base: str, headers: dict[str, str], body: bytes) -> tuple[http.client.HTTPResponse, float]:
    """POST /v1/lipsync over a plain socket: `body` and then nothing more (a client that stalls). Returns the
    response and the seconds it took."""
    port = urlsplit(base).port
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"127.0.0.1:{port}", **headers}.items())
    start = time.monotonic()
    sock.sendall(f"POST /v1/lipsync HTTP/1.1\r\n{head}\r\n".encode() + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    sock.close()
    return response, time.monotonic() - start


def _multipart(media, video_bytes: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files={"video": ("v.mp4", video_bytes), "audio": ("a.wav", (media / "a.wav").read_bytes())})
    return request.read(), request.headers["content-type"]


def test_oversized_upload_is_cut_off_while_it_streams(service, media):
    """Sent in chunks without a length, more than the limit, and then nothing: the answer is 413 at once, not a
    wait for a body that never ends."""
    base, work = service
    before = set(work["open"].rglob("*"))  # finished jobs keep their folders
    body, content_type = _multipart(media, os.urandom(UPLOAD_LIMIT + 500_000))
    sent = body[: UPLOAD_LIMIT + 200_000]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(sent[i : i + 65536]), sent[i : i + 65536]) for i in range(0, len(sent), 65536))
    response, seconds = _raw_upload(base, {"Content-Type": content_type, "Transfer-Encoding": "chunked"}, chunked)
    assert response.status == 413 and seconds < INPUT_TIMEOUT_S, (response.status, seconds)
    declared, _ = _raw_upload(base, {"Content-Type": content_type, "Content-Length": str(10 * UPLOAD_LIMIT)}, b"")
    assert declared.status == 413  # a declared length over the limit is refused before anything is read
    assert set(work["open"].rglob("*")) <= before  # the requests' folders are gone


def test_stalled_upload_times_out(service, media):
    base, _ = service
    body, content_type = _multipart(media, (media / "v.mp4").read_bytes())
    response, seconds = _raw_upload(base, {"Content-Type": content_type, "Content-Length": str(len(body))}, body[: len(body) // 2])
    assert response.status == 408 and INPUT_TIMEOUT_S <= seconds < INPUT_TIMEOUT_S + 10, (response.status, seconds)


def test_a_burst_of_requests_gets_answers_or_503(service, media):
    """16 clients at once against limits of 4 running + 8 queued: each request is answered or turned away with
    503; the Prepare replica runs its calls on several threads at once."""
    base, _ = service
    files = _files(media, "v2.mp4", "a2.wav")

    def call(_):
        return httpx.post(f"{base}/v1/lipsync", files=files, timeout=600)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(16)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 4, codes
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)
    assert all(r.headers["x-frames"] == "50" for r in responses if r.status_code == 200)


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
    port = free_port()
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


def test_restoration_fields(service, media, tmp_path):
    """enhance / enhance_strength per request: restored faces where lip-sync changed the picture; GFPGAN without its
    weights on the service is a 422 naming the field (and no path); the fields are in the OpenAPI docs."""
    base, _ = service
    upload = {"video": ("v.mp4", (media / "v.mp4").read_bytes()), "audio": ("a.wav", (media / "a.wav").read_bytes())}
    outputs = {}
    for name, data in (("plain", {}), ("restored", {"enhance": "tiny-random", "enhance_strength": "1"})):
        response = httpx.post(f"{base}/v1/lipsync", files=upload, data=data, timeout=300)
        assert response.status_code == 200, response.text
        (tmp_path / f"{name}.mp4").write_bytes(response.content)
        with FrameReader(tmp_path / f"{name}.mp4") as reader:
            outputs[name] = np.stack([reader[i] for i in range(0, 40, 4)]).astype(int)
    with FrameReader(media / "v.mp4") as reader:
        source = np.stack([reader[i] for i in range(0, 40, 4)]).astype(int)
    restored = np.abs(outputs["restored"] - outputs["plain"]).max(-1) > 40
    lip_synced = np.abs(outputs["plain"] - source).max(-1) > 40
    rows = lambda mask: np.flatnonzero(mask.any((0, 2)))  # noqa: E731
    assert restored.sum() > 1000 and set(rows(restored)) <= set(range(rows(lip_synced)[0] - 8, rows(lip_synced)[-1] + 9))
    refused = httpx.post(f"{base}/v1/lipsync", files=upload, data={"enhance": "gfpgan"}, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"] == {"field": "enhance", "message": "gfpgan is not available on this service"}
    body = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert {"enhance", "enhance_strength"} <= set(body["multipart/form-data"]["schema"]["properties"])


def test_face_speaker(service, media, tmp_path):
    """The ingress finds the speaker once and the Prepare replica starts from it (one face here: the frames of the
    default, the largest face); a service without the scorer's weights answers 422 naming the field."""
    base, _ = service
    upload = {"video": ("v.mp4", (media / "v.mp4").read_bytes()), "audio": ("a.wav", (media / "a.wav").read_bytes())}
    for face in ("speaker", "largest"):
        response = httpx.post(f"{base}/v1/lipsync", files=upload, data={"face": face}, timeout=300)
        assert response.status_code == 200, response.text
        (tmp_path / f"{face}.mp4").write_bytes(response.content)
    with FrameReader(tmp_path / "speaker.mp4") as speaker, FrameReader(tmp_path / "largest.mp4") as largest:
        for i in range(0, 40, 5):
            np.testing.assert_array_equal(speaker[i], largest[i])
    unscored = RequestInputs(ServeConfig(pipeline={**TINY, "score_model": "syncnet-v2", "checkpoints": str(tmp_path)}))
    with pytest.raises(InputError) as refused:
        unscored._params({"face": "speaker"})
    assert (refused.value.status, refused.value.field, refused.value.message) == (422, "face", "speaker is not available on this service")
