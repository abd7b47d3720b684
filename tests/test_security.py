"""The input policy without Ray: which URLs are read (judged before any lookup or connection where the URL names
an address), fetches under a byte limit, a deadline and per-hop redirect checks against a server on 127.0.0.1,
catalog ids and outputs, and the bulk job's refused rows. No traffic leaves this machine."""

import json
import socket
import time
from urllib.parse import quote, urlsplit

import fsspec
import pytest

from lipsync_ray import storage
from lipsync_ray.batch import plan_runs
from lipsync_ray.catalog import CatalogError, CatalogRow, read_catalog
from lipsync_ray.config import BatchConfig, InputPolicy, LipSyncConfig

from .conftest import DATA, loopback_http

WITH_HTTP = InputPolicy(protocols=("s3", "gs", "https", "http"))


@pytest.mark.parametrize(
    "address, category",
    [
        ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"), ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::7f00:1", "loopback"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
        ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "private"),
        ("fc00::1", "private"), ("::ffff:10.1.2.3", "private"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("240.0.0.1", "reserved"), ("8.8.8.8", None), ("2606:4700:4700::1111", None),
    ],
)
def test_address_categories(address, category):
    assert storage.address_category(address) == category


@pytest.fixture
def no_network(monkeypatch):
    """Any name lookup or connection fails the test: these URLs must be refused before either."""

    def connect(*args, **kwargs):
        raise AssertionError(f"looked up or connected: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", connect)
    monkeypatch.setattr(socket, "create_connection", connect)


@pytest.mark.parametrize(
    "url, words",
    [
        ("simplecache::file:///etc/passwd", "chained URLs"),
        ("s3://bucket/a.mp4::file:///etc/passwd", "chained URLs"),
        ("http://[::1]/a.mp4::file:///etc/passwd", "chained URLs"),
        ("file:///etc/passwd", "local paths are not accepted"),
        ("/etc/passwd", "local paths are not accepted"),
        ("memory://x", "only s3://, gs://, https://, http:// URLs"),
        ("data:text/plain,hello", "only s3://"),
        ("ftp://example.com/a.mp4", "only s3://"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data", "cloud metadata"),
        ("http://100.100.100.200/latest/meta-data", "cloud metadata"),
        ("https://[::ffff:169.254.169.254]/latest/meta-data", "cloud metadata"),
        ("http://127.0.0.1:8265/api/jobs/", "loopback"),
        ("http://[::1]:8000/", "loopback"),
        ("http://10.0.0.5/a.mp4", "private"),
        ("https://192.168.0.1/a.mp4", "private"),
        ("http://[fe80::1]/a.mp4", "link-local"),
        ("http://0.0.0.0:8000/a.mp4", "unspecified"),
    ],
)
def test_refused_before_any_lookup_or_connection(no_network, tmp_path, url, words):
    with pytest.raises(storage.InputRefused) as refused:
        storage.fetch(url, tmp_path / "video.mp4", "video_url", WITH_HTTP)
    assert refused.value.field == "video_url" and words in refused.value.message, refused.value.message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("host", ["localhost", "127.1", "2130706433", "0x7f.0.0.1"])
def test_names_are_judged_by_the_addresses_they_resolve_to(host):
    with pytest.raises(storage.InputRefused) as refused:
        storage.check_url(f"http://{host}:9/a.wav", "audio_url", WITH_HTTP)
    assert refused.value.field == "audio_url" and "loopback" in refused.value.message
    assert "127.0.0.1" not in refused.value.message  # what a name resolves to is not told


def test_allowed_hosts_and_private_networks(no_network):
    allowed = InputPolicy(protocols=("http",), allowed_hosts=("127.0.0.1:8080", "[::1]"))
    assert storage.check_url("http://127.0.0.1:8080/a.mp4", "v", allowed) == ["127.0.0.1"]
    assert storage.check_url("http://[::1]:9000/a.mp4", "v", allowed) == ["::1"]
    with pytest.raises(storage.InputRefused, match="loopback"):
        storage.check_url("http://127.0.0.1:8081/a.mp4", "v", allowed)  # another port of an allowed host
    private = InputPolicy(allow_private_networks=True)
    assert storage.check_url("https://10.0.0.5/a.mp4", "v", private) == ["10.0.0.5"]
    for url, words in [("https://127.0.0.1/a.mp4", "loopback"), ("https://169.254.169.254/", "cloud metadata")]:
        with pytest.raises(storage.InputRefused, match=words):
            storage.check_url(url, "v", private)
    assert storage.check_url("/data/clip.mp4", "v", InputPolicy(local_paths=True)) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    (folder / "clip.mp4").write_bytes(bytes(range(256)) * 1200)
    with loopback_http(folder) as base:
        yield base, folder


def _allowing(base: str, **extra) -> InputPolicy:
    """The policy of these tests: the loopback server (only its host:port) is allowed."""
    return InputPolicy(protocols=("http",), allowed_hosts=(urlsplit(base).netloc,), **extra)


def test_fetch_follows_redirects_checking_each_hop(site, tmp_path):
    base, folder = site
    port = urlsplit(base).port
    policy = _allowing(base)
    storage.fetch(f"{base}/redirect?to=/files/clip.mp4", tmp_path / "clip.mp4", "video_url", policy)
    assert (tmp_path / "clip.mp4").read_bytes() == (folder / "clip.mp4").read_bytes()
    elsewhere = [
        f"http://localhost:{port}/files/clip.mp4",  # the same server under a name that is not allowed
        f"http://127.0.0.1:{port + 1}/files/clip.mp4",  # another port
        f"http://[::1]:{port}/files/clip.mp4",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
        "simplecache::file:///etc/passwd",
    ]
    for target in elsewhere:
        url = f"{base}/redirect?to={quote(target)}"
        with pytest.raises(storage.InputRefused) as refused:
            storage.fetch(url, tmp_path / "other.mp4", "video_url", policy)
        assert refused.value.message == f"{url}: redirected to a location that is not accepted"
        assert refused.value.field == "video_url" and not (tmp_path / "other.mp4").exists()
    loop = "/files/clip.mp4"
    for _ in range(storage.MAX_REDIRECTS + 1):
        loop = f"/redirect?to={quote(loop)}"
    with pytest.raises(storage.InputRefused, match="more than 5 redirects"):
        storage.fetch(base + loop, tmp_path / "loop.mp4", "video_url", policy)
    with pytest.raises(storage.InputRefused, match="no such object"):
        storage.fetch(f"{base}/files/nope.mp4", tmp_path / "nope.mp4", "video_url", policy)


def test_fetch_stops_at_the_byte_limit_while_streaming(site, tmp_path):
    base, _ = site
    policy = _allowing(base)
    for url in (f"{base}/stream?bytes=50000000", f"{base}/files/clip.mp4"):  # without a length, and with one
        with pytest.raises(storage.InputTooLarge) as refused:
            storage.fetch(url, tmp_path / "big.mp4", "video_url", policy, max_bytes=100_000)
        assert "100000" in refused.value.message and not list(tmp_path.iterdir())
    storage.fetch(f"{base}/stream?bytes=100000", tmp_path / "fits.mp4", "video_url", policy, max_bytes=100_000)
    assert (tmp_path / "fits.mp4").stat().st_size == 100_000


def test_fetch_gives_up_at_the_deadline(site, tmp_path):
    base, _ = site
    start = time.monotonic()
    with pytest.raises(storage.InputTimeout) as stalled:
        storage.fetch(f"{base}/stall", tmp_path / "slow.mp4", "audio_url", _allowing(base), deadline=start + 1)
    assert stalled.value.field == "audio_url" and time.monotonic() - start < 3
    assert not list(tmp_path.iterdir())


def test_fetch_from_a_bucket_under_the_same_limit(s3_endpoint, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.mkdir("limits")
    fs.pipe_file("limits/clip.mp4", bytes(300_000))
    policy = InputPolicy()
    with pytest.raises(storage.InputTooLarge, match="300000 bytes is more than the 100000 allowed"):
        storage.fetch("s3://limits/clip.mp4", tmp_path / "clip.mp4", "video_url", policy, max_bytes=100_000)
    storage.fetch("s3://limits/clip.mp4", tmp_path / "clip.mp4", "video_url", policy, max_bytes=300_000)
    assert (tmp_path / "clip.mp4").stat().st_size == 300_000
    with pytest.raises(storage.InputRefused, match="s3://limits/nope.mp4: no such object"):
        storage.fetch("s3://limits/nope.mp4", tmp_path / "nope.mp4", "video_url", policy)


def _catalog(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps({"video": "s3://in/v.mp4", "audio": "s3://in/a.wav", **row}) + "\n" for row in rows))
    return str(path)


def test_catalog_ids_become_safe_object_names(tmp_path):
    ids = ["../../etc/evil", "a b", "a/b", "plain-id_1.0", ".staging", "-rf"]
    catalog = _catalog(tmp_path, [{"id": i} for i in ids])
    rows = read_catalog(catalog, "s3://bucket/out")
    names = [r.id for r in rows]
    assert names[3] == "plain-id_1.0" and len(set(names)) == len(ids)
    assert all(storage.SAFE_NAME.fullmatch(n) for n in names), names
    assert names[1].startswith("a_b-") and names[2].startswith("a_b-")  # the same characters, told apart by a hash
    assert all(r.output == f"s3://bucket/out/{r.id}.mp4" for r in rows)
    assert [r.id for r in read_catalog(catalog, "s3://bucket/out")] == names  # deterministic


@pytest.mark.parametrize(
    "output",
    [
        "s3://bucket/out/../secret.mp4", "s3://bucket/out/a/../../b.mp4", "s3://other/out/x.mp4", "s3://bucket/outside.mp4",
        "/etc/cron.d/x.mp4", "file:///tmp/x.mp4", "gs://bucket/out/x.mp4", "s3://bucket/out/.staging/x.mp4",
        "s3://bucket/out/manifest.parquet", "simplecache::s3://bucket/out/x.mp4", "s3://bucket/out",
    ],
)
def test_catalog_outputs_stay_below_the_output_prefix(tmp_path, output):
    with pytest.raises(CatalogError, match="outputs must be .mp4 files below s3://bucket/out"):
        read_catalog(_catalog(tmp_path, [{"id": "a"}, {"id": "b", "output": output}]), "s3://bucket/out")


def test_catalog_outputs_elsewhere_only_where_allowed_and_never_twice(tmp_path):
    catalog = _catalog(tmp_path, [{"id": "a", "output": "s3://later/a.mp4"}, {"id": "b", "output": "s3://bucket/out/sub/b.mp4"}])
    rows = read_catalog(catalog, "s3://bucket/out", output_prefixes=("s3://later",))
    assert [r.output for r in rows] == ["s3://later/a.mp4", "s3://bucket/out/sub/b.mp4"]
    with pytest.raises(CatalogError, match="duplicate outputs s3://bucket/out/b.mp4"):
        read_catalog(_catalog(tmp_path, [{"id": "a", "output": "s3://bucket/out/b.mp4"}, {"id": "b"}]), "s3://bucket/out")


def _plan(tmp_path, video: str, audio: str, **policy) -> list[dict]:
    job = BatchConfig(
        catalog=str(tmp_path / "catalog.csv"), output=str(tmp_path / "out"),
        pipeline=LipSyncConfig(model="tiny-random", detector="offline"),
        **({"inputs": InputPolicy(**policy)} if policy else {}),
    )
    row = CatalogRow("clip", video, audio, str(tmp_path / "out" / "clip.mp4"))
    return plan_runs({"id": row.id}, job, {row.id: row})


def test_bulk_job_rows_read_under_the_policy(tmp_path, no_network):
    video, audio = str(DATA / "demo1_video.mp4"), str(DATA / "demo1_audio.wav")
    planned = _plan(tmp_path, video, audio)  # the operator's catalog reads local paths by default
    assert planned[0]["error"] == "" and planned[0]["chunks"] > 1
    refused = [
        (("simplecache::" + video, audio), {}, f"video: simplecache::{video}: chained URLs"),
        ((video, "https://169.254.169.254/latest/meta-data/a.wav"), {}, "audio: https://169.254.169.254/latest/meta-data/a.wav: the host is on a cloud metadata address"),
        ((video, "memory://a.wav"), {}, "audio: memory://a.wav: only s3://, gs://, https:// URLs"),
        ((video, audio), {"local_paths": False}, f"video: {video}: local paths are not accepted"),
        ((video, audio), {"max_video_pixels": 1920 * 1080 - 1}, f"video: {video}: 1080x1920 is more than the 2073599 pixels allowed"),
        ((video, audio), {"max_video_frames": 100}, f"video: {video}: 250 frames is more than the 100 allowed"),
        ((video, audio), {"max_audio_seconds": 5}, f"audio: {audio}: the audio (9.6 s) is longer than the 5 s allowed"),
    ]
    for (v, a), policy, error in refused:
        [row] = _plan(tmp_path, v, a, **({"local_paths": True} | policy))
        assert row["chunks"] == 0 and row["error"].startswith(error), row["error"]
