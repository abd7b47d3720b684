"""storage: local copies of inputs (InputCache) and outputs that never show partial objects. The URL policy's
refusals are in test_security."""

import hashlib
import threading
from pathlib import Path

import fsspec
import pytest

from lipsync_ray import storage
from lipsync_ray.config import InputPolicy


def _put(cache: storage.InputCache, name: str, data: bytes) -> str:
    return cache.put(name, hashlib.sha1(data).hexdigest()[:16], data)


def test_shipped_bytes_are_written_once_and_only_the_recent_kept():
    cache = storage.InputCache(InputPolicy(), keep=2)
    try:
        first = _put(cache, "video.mp4", b"a" * 1000)
        assert _put(cache, "video.mp4", b"a" * 1000) == first and open(first, "rb").read() == b"a" * 1000
        _put(cache, "video.mp4", b"b")
        _put(cache, "video.mp4", b"c")
        assert not Path(first).exists()  # evicted: two newer inputs since
    finally:
        cache.close()


def test_threads_putting_the_same_input_see_it_whole():
    cache = storage.InputCache(InputPolicy())
    data = bytes(range(256)) * 40_000  # 10 MB: writing it takes a while
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(open(_put(cache, "audio.wav", data), "rb").read())) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 4 and all(s == data for s in seen)
    finally:
        cache.close()


def test_remote_inputs_are_copied_once_under_the_policy(s3_endpoint, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.mkdir("cache-test")
    fs.pipe_file("cache-test/clip.mp4", b"video bytes")
    cache = storage.InputCache(InputPolicy())
    try:
        local = cache.local("s3://cache-test/clip.mp4", "video")
        assert open(local, "rb").read() == b"video bytes" and local.endswith("clip.mp4")
        fs.pipe_file("cache-test/clip.mp4", b"changed")
        assert open(cache.local("s3://cache-test/clip.mp4", "video"), "rb").read() == b"video bytes"  # kept
        with pytest.raises(storage.InputRefused, match="video: s3://cache-test/none.mp4: no such object"):
            cache.local("s3://cache-test/none.mp4", "video")
        with pytest.raises(storage.InputRefused, match="local paths are not accepted"):
            cache.local(str(tmp_path / "x.mp4"), "video")  # the default policy reads no local files
    finally:
        cache.close()


def test_uploads_leave_no_partial_files(tmp_path):
    source = tmp_path / "out.mp4"
    source.write_bytes(b"x" * 100)
    target = tmp_path / "results" / "clip.mp4"
    storage.upload_atomic(source, str(target))
    storage.write_bytes_atomic(b"manifest", str(tmp_path / "results" / "manifest.parquet"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip.mp4", "manifest.parquet"]
