"""End to end on real media cuts with tiny-random, through the CLI."""

import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from lipsync_ray.cli import app
from lipsync_ray.media import FrameReader, probe_video

from .conftest import DATA

ARGS = ["--model", "tiny-random", "--steps", "2", "--detector", "offline"]


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    _ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "2.4", "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(d / "v.mp4"))
    _ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "1.6", "-ar", "44100", "-ac", "2", str(d / "a 'ü'.m4a"))
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
    ]:
        result = CliRunner().invoke(app, ["run", str(video), str(audio), "-o", str(out), *ARGS])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not any(tmp_path.iterdir())
