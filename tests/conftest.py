import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
SCRIPTS = Path(__file__).parent / "scripts"  # run in subprocesses by the tests

# test clusters run on 127.0.0.1 and without Ray 2.60's token auth (it turns itself on once ~/.ray/auth_token exists); set before ray loads
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every test cluster binds 127.0.0.1


def load_fixture(name: str):
    return torch.load(DATA / name, weights_only=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


@contextmanager
def serve_apps(apps: dict[str, tuple[str, dict]]):
    """Serve apps (name -> (route prefix, `build_app` args)) over HTTP on 127.0.0.1 in the running Ray; yields the
    base URL once every app answers /readyz, and shuts Serve down afterwards."""
    import httpx
    from ray import serve

    from lipsync_ray.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        for name, (prefix, args) in apps.items():
            serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
        for _ in range(120):
            if all(httpx.get(f"{base}{prefix.rstrip('/')}/readyz", timeout=10).status_code == 200 for prefix, _ in apps.values()):
                break
            time.sleep(1)
        yield base
    finally:
        serve.shutdown()


# source frame number drawn as a white mark in a 16 px band above the picture (see marks_shown)
MARK = "pad=iw:ih+16:0:16:black,format=yuv420p,geq=lum='if(lt(Y\\,16)\\,if(between(X\\,4*N\\,4*N+3)\\,255\\,0)\\,lum(X\\,Y))':cb='cb(X,Y)':cr='cr(X,Y)'"


def marks_shown(path) -> list[int]:
    """The source frame number each frame of a video made from a MARK-ed source shows."""
    from lipsync_ray.media import iter_frames

    shown = []
    for frame in iter_frames(path):
        band = frame[2:14].mean((0, 2))
        shown.append(round((np.flatnonzero(band > 128).mean() - 1.5) / 4))
    return shown


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1; credentials and endpoint reach every process through
    the standard AWS_* variables, as they would on a cluster."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A local Ray cluster on 127.0.0.1 per test module (started after the S3 variables are set; gone before
    the cluster tests start clusters of their own)."""
    import ray

    from lipsync_ray.serve import PROXY_CALLBACK_ENV

    os.environ.setdefault(*PROXY_CALLBACK_ENV)  # Serve's proxy middleware, as the cluster configs set it
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=400 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def cli_run_like_a_ray_worker(*args: str) -> None:
    """`lipsync-ray run` with one CPU thread, as Ray runs a 1-CPU actor (OMP_NUM_THREADS=1): float reductions
    then happen in the same order, so its frames can be compared bit for bit with the Ray job's and Serve's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "lipsync_ray.cli", "run", *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@contextmanager
def loopback_http(folder: Path):
    """A plain HTTP server on 127.0.0.1 for URL-fetch tests (yields its base URL): `/files/NAME` from `folder`,
    `/redirect?to=URL` (302), `/stream?bytes=N` (chunked, no length given) and `/stall` (a few bytes, then
    nothing until the server stops)."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's name
            self.close_connection = True  # one request per connection: nothing waits on a client that went away
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path.startswith("/files/") and (folder / url.path[7:]).is_file():
                    self._send(200, (folder / url.path[7:]).read_bytes())
                elif url.path == "/redirect":
                    self._send(302, b"", {"Location": query["to"]})
                elif url.path == "/stream":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for start in range(0, int(query["bytes"]), 65536):
                        piece = bytes(min(65536, int(query["bytes"]) - start))
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                elif url.path == "/stall":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(bytes(10))
                    self.wfile.flush()
                    stop.wait()
                else:
                    self._send(404, b"")
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: what these tests want
                pass

        def _send(self, status, body, headers=None):
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
