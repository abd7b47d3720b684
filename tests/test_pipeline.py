"""End to end on real media cuts with tiny-random, through the CLI."""

import os

import numpy as np
import pytest
from typer.testing import CliRunner

from lipsync_ray.cli import app
from lipsync_ray.media import FrameReader, probe_video

from .conftest import DATA, ffmpeg as _ffmpeg

ARGS = ["--model", "tiny-random", "--steps", "2", "--detector", "offline"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    _ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "2.4", "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(d / "v.mp4"))
    _ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "1.6", "-ar", "44100", "-ac", "2", str(d / "a 'ü'.m4a"))
    _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "1", str(d / "silent.wav"))
    return d


def test_run_writes_a_lip_synced_mp4(clips, tmp_path):
    out = tmp_path / "out put.mp4"
    result = CliRunner().invoke(app, ["run", str(clips / "v.mp4"), str(clips / "a 'ü'.m4a"), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert "40 frames" in result.output and "meaningless" in result.output
    info = probe_video(out)
    assert (info.width, info.height, info.fps, info.frames, info.has_audio) == (270, 480, 25, 40, True)
    src, dst = FrameReader(clips / "v.mp4"), FrameReader(out)
    changed = []
    for i in (0, 20, 39):
        diff = np.abs(src[i].astype(int) - dst[i].astype(int)).max(-1)
        assert np.median(diff) <= 3  # re-encoding only, away from the face
        assert diff[:120].max() < 40 and diff[300:].max() < 40  # above the head, below the chin
        changed.append((diff > 40).sum())
    assert min(changed) > 100  # the mouth region was regenerated


def test_bad_inputs_exit_2_and_leave_nothing(clips, tmp_path):
    out = tmp_path / "o.mp4"
    for video, audio, message in [
        (tmp_path / "missing.mp4", clips / "a 'ü'.m4a", "no such file"),
        (DATA / "ddim_scheduler.json", clips / "a 'ü'.m4a", "ddim_scheduler.json"),
        (clips / "a 'ü'.m4a", clips / "a 'ü'.m4a", "no video stream"),
        (clips / "v.mp4", clips / "silent.wav", "silent"),
    ]:
        result = CliRunner().invoke(app, ["run", str(video), str(audio), "-o", str(out), *ARGS])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def gap_clip(clips):
    """The cut with frames 14..23 covered (no face there)."""
    out = clips / "gap.mp4"
    _ffmpeg("-i", str(clips / "v.mp4"), "-vf", "drawbox=enable='between(n,14,23)':x=0:y=0:w=iw:h=ih:color=gray:t=fill", "-c:v", "libx264", str(out))
    return out


def test_frames_without_a_face_pass_through(clips, gap_clip, tmp_path):
    out = tmp_path / "gap_out.mp4"
    result = CliRunner().invoke(app, ["run", str(gap_clip), str(clips / "a 'ü'.m4a"), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert "10 without a face passed through" in result.output
    src, dst = FrameReader(gap_clip), FrameReader(out)
    for i in range(14, 24):
        assert np.abs(src[i].astype(int) - dst[i].astype(int)).max() <= 8
    for i in (5, 30):
        assert (np.abs(src[i].astype(int) - dst[i].astype(int)).max(-1) > 40).sum() > 100


def test_prepare_in_worker_processes_gives_the_same_video(clips, gap_clip, tmp_path):
    """`--prepare-workers 2`: chunks prepared in two spawned processes, out of order, come back in order and
    give exactly the frames that Prepare in a thread gives (face gap included)."""
    videos = []
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}.mp4"
        result = CliRunner().invoke(app, [
            "run", str(gap_clip), str(clips / "a 'ü'.m4a"), "-o", str(out), "--windows-per-chunk", "1",
            "--prepare-workers", str(workers), *ARGS,
        ])
        assert result.exit_code == 0, result.output
        assert "40 frames" in result.output and "10 without a face passed through" in result.output
        reader = FrameReader(out)
        videos.append(np.stack([reader[i] for i in range(40)]))
    np.testing.assert_array_equal(*videos)

    # a worker that cannot set up fails the run at once, with the reason, as Prepare in a thread does
    result = CliRunner().invoke(app, [
        "run", str(gap_clip), str(clips / "a 'ü'.m4a"), "-o", str(tmp_path / "no.mp4"), "--prepare-workers", "1",
        "--model", "tiny-random", "--detector", "insightface", "--checkpoints", str(tmp_path / "none"),
    ])
    assert result.exit_code == 2 and "buffalo_l" in result.output, result.output
    assert not (tmp_path / "no.mp4").exists()


def test_every_prepare_worker_is_set_up_before_the_first_video():
    """The process pool starts workers on demand: without waiting for all of them, the second would load its
    models during the first video, and the first chunk's two parts would be prepared one after the other."""
    from lipsync_ray.config import LipSyncConfig
    from lipsync_ray.pipeline import LipSyncPipeline

    with LipSyncPipeline(LipSyncConfig(model="tiny-random", detector="offline", prepare_workers=2, device="cpu")) as pipeline:
        processes = list(pipeline.workers._processes.values())
        assert len(processes) == 2 and all(p.is_alive() for p in processes)


def test_lower_priority_work_runs_in_its_own_thread_and_leaves_the_caller_as_it_was():
    from lipsync_ray.stages import PREPARE_NICE, at_lower_priority

    mine = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread's niceness
    assert at_lower_priority(os.getpriority, os.PRIO_PROCESS, 0) == min(mine + PREPARE_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine
    with pytest.raises(ZeroDivisionError):  # errors reach the caller
        at_lower_priority(divmod, 1, 0)


def test_video_without_any_face(clips, tmp_path):
    blank = tmp_path / "blank.mp4"
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=160x120:r=25", "-t", "1", "-c:v", "libx264", str(blank))
    out = tmp_path / "o.mp4"
    result = CliRunner().invoke(app, ["run", str(blank), str(clips / "a 'ü'.m4a"), "-o", str(out), *ARGS])
    assert result.exit_code == 2 and "no face found" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        app, ["run", str(blank), str(clips / "a 'ü'.m4a"), "-o", str(out), "--on-no-face", "passthrough", *ARGS]
    )
    assert result.exit_code == 0, result.output
    info = probe_video(out)
    assert info.frames == 40  # the 1 s video ping-pongs to the 1.6 s of audio


def test_demo_falls_back_to_tiny_random_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSYNC_CHECKPOINTS", str(tmp_path / "empty"))
    out = tmp_path / "demo.mp4"
    result = CliRunner().invoke(app, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "real checkpoints unavailable" in result.output and "meaningless" in result.output
    info = probe_video(out)
    assert (info.width, info.height, info.frames, info.has_audio) == (360, 640, 75, True)


def test_bad_option_names_the_option(clips, tmp_path):
    result = CliRunner().invoke(app, ["run", str(clips / "v.mp4"), str(clips / "a 'ü'.m4a"), "-o", str(tmp_path / "o.mp4"), *ARGS, "--resolution", "300"])
    assert result.exit_code == 2 and "--resolution" in result.output
