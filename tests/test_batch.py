"""The Ray Data bulk job against a real S3-compatible server and a local Ray cluster, with tiny-random."""

import fsspec
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lipsync_ray.batch import BatchConfig, Pools, run_batch
from lipsync_ray.catalog import read_manifest
from lipsync_ray.cli import app
from lipsync_ray.config import LipSyncConfig
from lipsync_ray.eval import SyncScorer
from lipsync_ray.media import FrameReader, probe_video

from .conftest import DATA, MARK, cli_run_like_a_ray_worker, ffmpeg, marks_shown

PIPELINE = dict(model="tiny-random", steps=1, detector="offline", windows_per_chunk=1)


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    """s3://media holding real cuts, a corrupt file and a catalog that also names a missing object."""
    d = tmp_path_factory.mktemp("s3media")
    cut = lambda src, seconds, out, vf="scale=270:480": ffmpeg("-i", str(DATA / src), "-t", str(seconds), "-vf", vf, "-c:v", "libx264", "-an", str(d / out))  # noqa: E731
    cut("demo1_video.mp4", 1.6, "short.mp4")
    cut("demo1_video.mp4", 1.2, "thirty.mp4", "fps=30,scale=270:480")
    cut("demo1_video.mp4", 2.0, "long.mp4", f"scale=270:480,{MARK}")
    cut("demo2_video.mp4", 1.2, "other.mp4")
    for src, seconds, out in [("demo1_audio.wav", 1.6, "a16.wav"), ("demo1_audio.wav", 2.8, "a28.m4a"), ("demo2_audio.wav", 1.2, "b12.wav")]:
        ffmpeg("-i", str(DATA / src), "-t", str(seconds), str(d / out))
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    fs = fsspec.filesystem("s3")
    fs.mkdir("media")
    for f in d.iterdir():
        fs.put_file(str(f), f"media/in/{f.name}")
    rows = [
        ("short", "short.mp4", "a16.wav"), ("thirty", "thirty.mp4", "a16.wav"), ("long", "long.mp4", "a28.m4a"),
        ("other", "other.mp4", "b12.wav"), ("corrupt", "corrupt.mp4", "a16.wav"), ("missing", "nowhere.mp4", "a16.wav"),
    ]
    catalog = pd.DataFrame([{"id": i, "video": f"s3://media/in/{v}", "audio": f"s3://media/in/{a}"} for i, v, a in rows])
    catalog.loc[len(catalog)] = {"id": "chained", "video": "simplecache::s3://media/in/short.mp4", "audio": "s3://media/in/a16.wav"}
    catalog.loc[catalog.id == "other", "output"] = "s3://later/other.mp4"  # a bucket created only before the rerun
    catalog["steps"] = [1, 1, 6, 1, 1, 1, 1]  # a per-row parameter; the long video's chunks keep both GPU actors busy
    with fs.open("media/catalog.parquet", "wb") as f:
        catalog.to_parquet(f)
    return d


def _job(**kw):
    return BatchConfig(
        catalog="s3://media/catalog.parquet", output="s3://media/out", pipeline=LipSyncConfig(**PIPELINE),
        prepare_actors=(2, 2), generate_actors=(2, 2), chunks_per_batch=1,
        chunks_per_prepare=2, output_prefixes=("s3://later",), **kw,  # the long video: several runs of two chunks
    )


@pytest.fixture(scope="module")
def first_run(ray_local, bucket):
    finished = []
    manifest = run_batch(_job(), on_video=lambda m: finished.append(m.id))
    return {m.id: m for m in manifest}, finished


def _download(url, tmp_path):
    local = tmp_path / url.rsplit("/", 1)[1]
    fsspec.filesystem("s3").get_file(url.removeprefix("s3://"), str(local))
    return local


@pytest.mark.parametrize(
    "pools, cluster_gpus, gpu, expected",
    [
        ({}, 1, True, Pools((2, 4), (1, None), 2)),  # the defaults on one GPU: the GPU pool may grow, so it queues
        ({}, 4, True, Pools((2, 16), (1, None), 2)),  # Prepare follows the cluster's GPUs
        ({"generate_actors": (1, 8)}, 0, True, Pools((2, 32), (1, 8), 2)),  # ... or those the GPU pool may reach
        ({}, 0, False, Pools((2, 4), (1, 1), 1)),  # no GPUs: one Generate actor, a fixed pool, nothing queued
        ({"prepare_actors": (3, 5), "generate_actors": (2, 2), "generate_prefetch": 2}, 8, True, Pools((3, 5), (2, 2), 2)),
    ],
)
def test_pool_bounds(pools, cluster_gpus, gpu, expected, tmp_path):
    job = BatchConfig(catalog=str(tmp_path / "c.jsonl"), output=str(tmp_path), **pools)
    assert Pools.of(job, cluster_gpus, gpu) == expected


def test_outputs_and_manifest(first_run, tmp_path):
    manifest, finished = first_run
    status = {k: m.status for k, m in manifest.items()}
    assert status == {"short": "ok", "thirty": "ok", "long": "ok", "other": "failed", "corrupt": "failed", "missing": "failed", "chained": "failed"}
    assert "corrupt.mp4" in manifest["corrupt"].error
    assert "video: s3://media/in/nowhere.mp4: no such object" in manifest["missing"].error
    assert manifest["chained"].error == "video: simplecache::s3://media/in/short.mp4: chained URLs (::) are not accepted"
    assert "s3://later/other.mp4" in manifest["other"].error
    stored = read_manifest("s3://media/out/manifest.parquet").set_index("id")
    assert list(stored.index) == ["short", "thirty", "long", "other", "corrupt", "missing", "chained"]
    assert stored.loc["long", "status"] == "ok" and stored.loc["long", "frames"] == 70
    for vid, frames, seconds in [("short", 40, 1.6), ("thirty", 40, 1.2), ("long", 70, 2.0)]:
        m = manifest[vid]
        assert m.frames == frames and m.output == f"s3://media/out/{vid}.mp4" and m.generate_s > 0
        assert m.input_seconds == pytest.approx(seconds) and m.output_seconds == frames / 25
        info = probe_video(_download(m.output, tmp_path))
        assert (info.fps, info.frames, info.width, info.has_audio) == (25, frames, 270, True)
    assert fsspec.filesystem("s3").ls("media/out") == [f"media/out/{n}" for n in (".staging", "long.mp4", "manifest.parquet", "short.mp4", "thirty.mp4")]
    assert finished.index("short") < len(finished) - 1  # videos finish one by one, not all at the end


def test_long_video_frames_are_exact_and_spread_over_actors(first_run, tmp_path):
    manifest, _ = first_run
    long = manifest["long"]
    assert long.chunks >= 3 and len(long.workers) >= 2, long
    shown = marks_shown(_download(long.output, tmp_path))
    assert shown == [*range(50), *range(49, 29, -1)]  # ping-pong, no frame repeated or dropped


def test_rerun_skips_finished_videos_and_reuses_finished_chunks(first_run, ray_local):
    fsspec.filesystem("s3").mkdir("later")
    manifest = {m.id: m for m in run_batch(_job())}
    assert {k: m.status for k, m in manifest.items()} == {
        "short": "skipped", "thirty": "skipped", "long": "skipped", "other": "ok", "corrupt": "failed", "missing": "failed",
        "chained": "failed",
    }
    other = manifest["other"]
    assert other.chunks_reused == other.chunks == first_run[0]["other"].chunks  # only compose ran again
    assert other.generate_s == 0 and other.frames == 30


def test_batch_and_run_give_the_same_frames(first_run, bucket, tmp_path):
    out = tmp_path / "run.mp4"
    args = ["--model", "tiny-random", "--steps", "6", "--detector", "offline", "--windows-per-chunk", "1"]
    cli_run_like_a_ray_worker(str(bucket / "long.mp4"), str(bucket / "a28.m4a"), "-o", str(out), *args)
    batch = _download(first_run[0]["long"].output, tmp_path)
    with FrameReader(out) as a, FrameReader(batch) as b:
        assert a.frames == b.frames == 70
        for i in range(70):
            np.testing.assert_array_equal(a[i], b[i])


def test_cli_batch_on_local_files(ray_local, bucket, tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(f"video,audio,seed\n{bucket / 'short.mp4'},{bucket / 'a16.wav'},7\n{bucket / 'nope.mp4'},{bucket / 'a16.wav'},7\n")
    args = ["--model", "tiny-random", "--steps", "1", "--detector", "offline", "--prepare-actors", "1,1", "--generate-actors", "1,1"]
    args += ["--generate-prefetch", "2"]  # calls queued at the one GPU actor
    result = CliRunner().invoke(app, ["batch", "--catalog", str(catalog), "--output", str(tmp_path / "out"), *args])
    assert result.exit_code == 1, result.output  # one video failed
    assert "2 videos: 1 ok, 0 skipped, 1 failed" in result.output
    assert probe_video(tmp_path / "out" / "short.mp4").frames == 40
    bad = CliRunner().invoke(app, ["batch", "--catalog", str(tmp_path / "none.csv"), "--output", str(tmp_path / "o"), *args])
    assert bad.exit_code == 2 and "none.csv: no such catalog" in bad.output


@pytest.mark.slow  # three videos through a job, a run and scoring: about a minute on 2 cores
def test_restoration_scoring_and_the_speaker_in_a_job(ray_local, bucket, tmp_path):
    """Rows that ask for face restoration get it as `run` does; with --score every output is scored as it is
    written, and below --min-confidence marked low_sync (kept; exit code 3); face=speaker rows are planned by it."""
    short, speech = bucket / "short.mp4", bucket / "a16.wav"
    catalog = tmp_path / "catalog.csv"
    rows = [("plain", "", ""), ("restored", "tiny-random", "1"), ("speaker", "", "")]
    catalog.write_text("id,video,audio,enhance,enhance_strength,face\n" + "".join(
        f"{name},{short},{speech},{enhance},{strength},{'speaker' if name == 'speaker' else ''}\n" for name, enhance, strength in rows
    ))
    args = ["--model", "tiny-random", "--steps", "1", "--detector", "offline", "--prepare-actors", "1,1", "--generate-actors", "1,1"]
    scoring = ["--score", "--score-model", "tiny-random", "--min-confidence", "1e9"]
    result = CliRunner().invoke(app, ["batch", "--catalog", str(catalog), "--output", str(tmp_path / "out"), *args, *scoring])
    assert result.exit_code == 3, result.output
    assert "3 videos: 0 ok, 3 low_sync, 0 skipped, 0 failed" in result.output
    manifest = read_manifest(str(tmp_path / "out" / "manifest.parquet")).set_index("id")
    assert list(manifest.status) == ["low_sync"] * 3 and (manifest.score_s > 0).all() and (manifest.error == "").all()
    assert manifest.loc["plain", "enhance_s"] == 0
    assert 0 < manifest.loc["restored", "enhance_s"] < manifest.loc["restored", "compose_s"]
    scorer = SyncScorer("tiny-random", detector="offline")
    scorer.setup()
    for name in ("plain", "restored"):  # the outputs' own scores
        expected = scorer(tmp_path / "out" / f"{name}.mp4").columns()
        assert manifest.loc[name, ["lse_c", "lse_d", "av_offset"]].to_dict() == pytest.approx(expected, rel=1e-4)
    local = tmp_path / "run.mp4"
    cli_run_like_a_ray_worker(str(short), str(speech), "-o", str(local), *args[:6], "--enhance", "tiny-random", "--enhance-strength", "1")
    out = tmp_path / "out"
    with FrameReader(local) as run, FrameReader(out / "restored.mp4") as job, FrameReader(out / "plain.mp4") as plain, FrameReader(out / "speaker.mp4") as speaker:
        assert run.frames == job.frames == speaker.frames == 40
        assert any(not np.array_equal(job[i], plain[i]) for i in range(0, 40, 8))
        for i in range(40):
            np.testing.assert_array_equal(job[i], run[i])
            np.testing.assert_array_equal(speaker[i], plain[i])  # one face: the speaker is the face followed anyway
