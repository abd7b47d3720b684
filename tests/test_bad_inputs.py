"""A corpus of bad inputs, made with ffmpeg at test time, through the three ways in: `lipsync-ray run`, the bulk job
and the Serve endpoint (tiny-random, one local Ray cluster and one Serve app for the module). Each input gets a
clear error naming it, or a correct output; never a hang, a traceback or a partial output file."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from lipsync_ray import cli, storage
from lipsync_ray.batch import run_batch
from lipsync_ray.catalog import read_manifest
from lipsync_ray.config import BatchConfig, InputPolicy, LipSyncConfig
from lipsync_ray.media import AudioTooLong, MediaError, load_audio, probe_audio, probe_video
from lipsync_ray.stages import plan_video
from lipsync_ray.storage import InputTooLarge

from .conftest import DATA, ffmpeg, serve_apps

TINY = {"model": "tiny-random", "steps": 1, "detector": "offline"}
ODD_VIDEO = """it's a "clip"; ünïcødé 🎬 $(id).mp4"""
ODD_AUDIO = "say \"hi\"; it's ünïcødé.wav"
SERVE_MAX_JOB_SECONDS = 10
BATCH_MAX_AUDIO_SECONDS = 60


@dataclass(frozen=True)
class Case:
    """One input pair and what each way in must answer: `frames` of output (an ok), or an error naming `field`
    with `words` in it (`status`: Serve's HTTP status for it)."""

    name: str
    video: str
    audio: str
    frames: int = 0
    field: str = ""
    words: str = ""
    status: int = 422
    run_words: str = ""  # `run` has no job limit: what it says instead, where it differs
    batch_words: str = ""  # the bulk job's limits (max_audio_seconds): what it says instead, where it differs

    @property
    def named(self) -> str:
        """The input the error must name."""
        return self.audio if self.field == "audio" else self.video


CASES = [
    Case("good", "good.mp4", "good.wav", frames=16),
    Case("truncated", "truncated.mp4", "good.wav", field="video", words="not a readable video"),
    # moov first, half the frames' bytes missing: the frames that are there, the missing ones shown as the last before
    Case("truncated_faststart", "truncated_faststart.mp4", "good.wav", frames=16),
    Case("garbled", "garbled.mp4", "good.wav", field="video", words="cannot be decoded"),
    Case("empty_video", "empty.mp4", "good.wav", field="video", words="the file is empty"),
    Case("empty_audio", "good.mp4", "empty.wav", field="audio", words="the file is empty"),
    Case("audio_as_video", "audio_only.mp4", "good.wav", field="video", words="has no video stream"),
    Case("video_as_audio", "good.mp4", "video_only.mp4", field="audio", words="has no audio stream"),
    Case("short_audio", "good.mp4", "short.wav", frames=5),  # 0.2 s: 5 frames
    Case(
        "long_silence", "good.mp4", "silence_10min.ogg", field="audio", status=413,
        words=f"the audio (600.0 s) is longer than the {SERVE_MAX_JOB_SECONDS} s allowed", run_words="the audio is silent",
        batch_words=f"the audio (600.0 s) is longer than the {BATCH_MAX_AUDIO_SECONDS} s allowed",
    ),
    Case("tiny_1x1", "tiny_1x1.mp4", "good.wav", field="video", words="no face found"),
    Case("huge_8k", "huge_8k.mp4", "good.wav", field="video", status=413, words="7680x4320 is more than the 8294400 pixels allowed"),
    Case("png_as_mp4", "picture.mp4", "good.wav", frames=16),  # a still picture is a one-frame video
    Case("odd_names", ODD_VIDEO, ODD_AUDIO, frames=16),
]
BAD = [c for c in CASES if not c.frames]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad inputs")  # a space in every path
    clip = ["-i", str(DATA / "demo1_video.mp4"), "-t", "0.64", "-vf", "scale=144:256", "-c:v", "libx264", "-preset", "ultrafast", "-an"]
    ffmpeg(*clip, str(d / "good.mp4"))
    ffmpeg("-ss", "1", "-i", str(DATA / "demo1_audio.wav"), "-t", "0.64", str(d / "good.wav"))
    ffmpeg("-ss", "1", "-i", str(DATA / "demo1_audio.wav"), "-t", "0.2", str(d / "short.wav"))
    data = (d / "good.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    ffmpeg(*clip, "-movflags", "+faststart", str(d / "faststart.mp4"))
    data = (d / "faststart.mp4").read_bytes()
    (d / "truncated_faststart.mp4").write_bytes(data[: len(data) // 2])
    garbled = bytearray(data)  # a container that probes fine over frames that are noise
    start = garbled.find(b"mdat") + 200
    garbled[start:] = random.Random(0).randbytes(len(garbled) - start)
    (d / "garbled.mp4").write_bytes(bytes(garbled))
    (d / "faststart.mp4").unlink()
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.wav").write_bytes(b"")
    ffmpeg("-i", str(d / "good.wav"), "-c:a", "aac", str(d / "audio_only.mp4"))
    shutil.copy(d / "good.mp4", d / "video_only.mp4")
    # 10 minutes of silence at 6 kbit/s: 220 kB on disk, 19 MB once decoded
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "600", "-c:a", "libopus", "-b:a", "6k", str(d / "silence_10min.ogg"))
    ffmpeg("-f", "lavfi", "-i", "nullsrc=size=2x2:rate=25:duration=0.4,scale=1:1,format=yuv444p", "-c:v", "libx264", str(d / "tiny_1x1.mp4"))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=7680x4320:rate=25", "-frames:v", "2", "-c:v", "libx264", "-preset", "ultrafast", str(d / "huge_8k.mp4"))
    ffmpeg("-i", str(d / "good.mp4"), "-frames:v", "1", "-f", "image2", "-c:v", "png", str(d / "picture.mp4"))  # a PNG named .mp4
    assert (d / "picture.mp4").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(d / "good.mp4", d / ODD_VIDEO)
    shutil.copy(d / "good.wav", d / ODD_AUDIO)
    return d


def _leftovers(folder: Path, expected: set[str]) -> list[str]:
    """Files under `folder` other than `expected` names (partial outputs, temporary files)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in expected)


# --- the probes: one for the limits, before anything is decoded --------------------------------------------------


def test_limits_are_judged_on_the_probes_before_decoding(corpus, monkeypatch):
    """A video over the pixel limit and audio over the length limit are refused without decoding either (and the
    video is probed once); a header that understates the audio's length is caught while decoding, which stops
    just past the limit."""
    import lipsync_ray.stages as stages

    probes, decoded = [], []
    monkeypatch.setattr(stages, "probe_video", lambda path: probes.append(path) or probe_video(path))
    monkeypatch.setattr(stages, "load_audio", lambda *a, **k: decoded.append(a) or load_audio(*a, **k))
    cfg = LipSyncConfig(**TINY)
    with pytest.raises(InputTooLarge) as refused:
        plan_video(corpus / "huge_8k.mp4", corpus / "good.wav", cfg, limits=InputPolicy())
    assert refused.value.field == "video" and str(refused.value).startswith(f"video: {corpus / 'huge_8k.mp4'}: 7680x4320 is more")
    with pytest.raises(InputTooLarge) as refused:
        plan_video(corpus / "good.mp4", corpus / "silence_10min.ogg", cfg, limits=InputPolicy(max_audio_seconds=60))
    assert refused.value.field == "audio" and "silence_10min.ogg: the audio (600.0 s) is longer than the 60 s allowed" in str(refused.value)
    assert decoded == [] and len(probes) == 2
    with pytest.raises(InputTooLarge, match="longer than the 5 s allowed"):  # the job's own limit, below the policy's
        plan_video(corpus / "good.mp4", corpus / "silence_10min.ogg", cfg, limits=InputPolicy(), max_seconds=5)
    plan = plan_video(corpus / "good.mp4", corpus / "good.wav", cfg, limits=InputPolicy(), info=probe_video(corpus / "good.mp4"))
    assert plan.n_out == 16 and len(probes) == 3  # a probe passed in is not made again

    assert probe_audio(corpus / "silence_10min.ogg") == pytest.approx(600, abs=0.1)
    with pytest.raises(MediaError, match="has no audio stream"):
        probe_audio(corpus / "video_only.mp4")
    with pytest.raises(AudioTooLong, match="silence_10min.ogg: the audio is longer than the 30 s allowed"):
        load_audio(corpus / "silence_10min.ogg", max_seconds=30)  # what a lying header gets: decoding stops at 31 s


# --- lipsync-ray run ----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_run(corpus, tmp_path):
    """`lipsync-ray run` on every input: exit 0 with the output, or exit 2 with one line naming the input and no
    output file, partial or not."""
    runner = CliRunner()
    options = ["--model", "tiny-random", "--steps", "1", "--detector", "offline"]
    for case in CASES:
        out = tmp_path / case.name / "out.mp4"
        out.parent.mkdir()
        result = runner.invoke(cli.app, ["run", str(corpus / case.video), str(corpus / case.audio), "-o", str(out), *options])
        assert result.exception is None or isinstance(result.exception, SystemExit), (case.name, result.exception)
        assert "Traceback" not in result.output, (case.name, result.output)
        if case.frames:
            assert result.exit_code == 0 and probe_video(out).frames == case.frames, (case.name, result.output)
            assert _leftovers(out.parent, {"out.mp4"}) == [], case.name
        else:
            error = [line for line in result.output.splitlines() if line.startswith("error: ")]
            assert result.exit_code == 2 and len(error) == 1, (case.name, result.output)
            assert case.named in error[0] and (case.run_words or case.words) in error[0], (case.name, error)
            assert error[0].count(case.named) == 1, error  # named once
            assert _leftovers(out.parent, set()) == [], case.name
    out = tmp_path / "1x1.mp4"  # kept whole when asked to: a 1x1 video in, a 1x1 video out
    result = runner.invoke(cli.app, ["run", str(corpus / "tiny_1x1.mp4"), str(corpus / "good.wav"), "-o", str(out), *options, "--on-no-face", "passthrough"])
    assert result.exit_code == 0 and "16 without a face passed through" in result.output, result.output
    assert (probe_video(out).width, probe_video(out).height, probe_video(out).frames) == (1, 1, 16)


@pytest.mark.timeout(120)
def test_run_in_a_shell_with_odd_names(corpus, tmp_path):
    """The real command, names with spaces, quotes, unicode, `;` and `$(...)` passed through a shell."""
    out = tmp_path / "out; 'ü' $(id).mp4"
    script = f"{sys.executable} -m lipsync_ray.cli run \"$V\" \"$A\" -o \"$O\" --model tiny-random --steps 1 --detector offline"
    env = {**os.environ, "V": str(corpus / ODD_VIDEO), "A": str(corpus / ODD_AUDIO), "O": str(out)}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=110, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert probe_video(out).frames == 16 and _leftovers(tmp_path, {out.name}) == []


# --- the bulk job -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bulk(ray_local, corpus, tmp_path_factory):
    """One job over a catalog of every case (the odd-named one without an id: it is made from the file name)."""
    root = tmp_path_factory.mktemp("bulk")
    rows = [{"id": "" if c.name == "odd_names" else c.name, "video": str(corpus / c.video), "audio": str(corpus / c.audio)} for c in CASES]
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    job = BatchConfig(
        catalog=str(root / "catalog.csv"), output=str(root / "out"), pipeline=LipSyncConfig(**TINY),
        prepare_actors=(1, 1), generate_actors=(1, 1), inputs=InputPolicy(local_paths=True, max_audio_seconds=BATCH_MAX_AUDIO_SECONDS),
    )
    start = time.monotonic()
    manifest = run_batch(job)
    return root / "out", manifest, time.monotonic() - start


@pytest.mark.slow  # a Ray Data job over 14 rows, 5 of them composed: 1-2 minutes on 2 cores
@pytest.mark.timeout(600)
def test_bulk_job(bulk):
    """The good inputs ok, every bad one a failed manifest row whose error names the input; outputs for the ok
    rows only, nothing partial under the output prefix."""
    out, manifest, seconds = bulk
    assert len(manifest) == len(CASES)
    odd = next(m for m in manifest if Path(m.video).name == ODD_VIDEO)
    assert storage.SAFE_NAME.fullmatch(odd.id) and odd.output == str(out / f"{odd.id}.mp4")  # a safe name from the file's
    rows = {m.id: m for m in manifest} | {"odd_names": odd}
    for case in CASES:
        m = rows[case.name]
        if case.frames:
            assert m.status == "ok" and m.frames == case.frames, (case.name, m.error)
            assert probe_video(out / f"{m.id}.mp4").frames == case.frames
        else:
            assert m.status == "failed", (case.name, m)
            assert case.named in m.error and (case.batch_words or case.words) in m.error, (case.name, m.error)
            assert "Traceback" not in m.error and not (out / f"{m.id}.mp4").exists()
    oks = {f"{m.id}.mp4" for m in manifest if m.status == "ok"}
    assert _leftovers(out, oks | {"manifest.parquet"}) == []
    assert sorted(read_manifest(str(out / "manifest.parquet")).status) == sorted(m.status for m in manifest)
    print(f"bulk job over {len(CASES)} rows: {seconds:.1f} s")


# --- Serve --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    """One app with the default input limits (4K pixels), sync requests up to 3 s and jobs up to 10 s."""
    work = tmp_path_factory.mktemp("serve_work")
    args = {
        "pipeline": TINY, "gpu": False, "max_sync_seconds": 3, "max_job_seconds": SERVE_MAX_JOB_SECONDS, "work_dir": str(work),
        "prepare_replicas": (1, 1), "generate_replicas": (1, 1), "input_timeout_s": 30,
    }
    with serve_apps({"bad_inputs": ("/", args)}) as base:
        yield base, work


@pytest.mark.timeout(600)
@pytest.mark.parametrize("route", ["/v1/lipsync", "/v1/jobs"])
def test_serve(service, corpus, tmp_path, route):
    """Uploads to both routes: a 4xx JSON error naming the field and the input (by its upload name, never our
    folders), or the mp4; never a 500 or a traceback, and no request's files are left behind."""
    base, work = service
    before = set(work.iterdir())
    for case in CASES:
        files = {name: (getattr(case, name), (corpus / getattr(case, name)).read_bytes()) for name in ("video", "audio")}
        response = httpx.post(f"{base}{route}", files=files, timeout=120)
        assert "Traceback" not in response.text and str(work) not in response.text, (case.name, response.text)
        if route == "/v1/jobs" and response.status_code == 202:  # errors found only while working come with the job
            response = _finished_job(base, response.json()["id"])
        if case.frames:
            assert response.status_code == 200 and response.headers["content-type"] == "video/mp4", (case.name, response.text)
            (tmp_path / "served.mp4").write_bytes(response.content)
            assert probe_video(tmp_path / "served.mp4").frames == case.frames
        else:
            assert 400 <= response.status_code < 500, (case.name, response.status_code, response.text)
            body = response.json()
            error = body["error"]
            assert set(body) == {"error"} or route == "/v1/jobs", body
            assert response.status_code == case.status and error["field"] == case.field, (case.name, body)
            assert case.words in error["message"], (case.name, error)
            assert error["message"].startswith(f"{case.field}."), (case.name, error)  # the input, by the name it is kept under
    if route == "/v1/lipsync":  # a request's folder goes once its answer is sent (jobs keep theirs for an hour)
        for _ in range(50):
            if not set(work.iterdir()) - before:
                break
            time.sleep(0.1)
        assert set(work.iterdir()) - before == set()


def _finished_job(base: str, job: str) -> httpx.Response:
    for _ in range(600):
        status = httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.2)
    return httpx.get(f"{base}/v1/jobs/{job}/result", timeout=60)


# --- the batch command's input options ----------------------------------------------------------------------


def test_batch_options_for_the_input_policy_and_output_prefixes(monkeypatch, tmp_path):
    """--inputs (JSON over the job's default policy) and --output-prefixes reach the BatchConfig; their defaults
    and help come from its fields."""
    jobs = []
    monkeypatch.setattr(cli, "connect_ray", lambda address: None)
    monkeypatch.setattr("lipsync_ray.batch.run_batch", lambda job, on_video=None: jobs.append(job) or [])
    runner = CliRunner()
    common = ["batch", "--catalog", str(tmp_path / "c.csv"), "--output", str(tmp_path / "out"), "--model", "tiny-random"]
    assert runner.invoke(cli.app, common).exit_code == 0
    assert jobs[-1].inputs == BatchConfig.model_fields["inputs"].default_factory() and jobs[-1].output_prefixes == ()
    policy = {"protocols": ["s3", "http"], "max_audio_seconds": 90, "allowed_hosts": ["127.0.0.1:9000"]}
    result = runner.invoke(cli.app, [*common, "--inputs", json.dumps(policy), "--output-prefixes", "s3://later,gs://elsewhere/out"])
    assert result.exit_code == 0, result.output
    job = jobs[-1]
    assert (job.inputs.protocols, job.inputs.max_audio_seconds, job.inputs.allowed_hosts) == (("s3", "http"), 90, ("127.0.0.1:9000",))
    assert job.inputs.local_paths and job.output_prefixes == ("s3://later", "gs://elsewhere/out")  # unset fields keep the job's default
    for bad, words in [('{"max_audio_seconds": -1}', "inputs.max_audio_seconds"), ('{"no_such_limit": 1}', "inputs.no_such_limit"),
                       ("[1, 2]", "error: --inputs: expected a JSON object"), ("{not json", "error: --inputs: expected a JSON object")]:
        result = runner.invoke(cli.app, [*common, "--inputs", bad])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, (bad, result.output)
    assert len(jobs) == 2
    options = {p.name: p for p in typer.main.get_command(cli.app).commands["batch"].params}
    for name in ("inputs", "output_prefixes"):
        assert options[name].help.startswith(BatchConfig.model_fields[name].description)
    assert json.loads(options["inputs"].default) == BatchConfig.model_fields["inputs"].default_factory().model_dump(mode="json")
    assert options["output_prefixes"].default == ""
