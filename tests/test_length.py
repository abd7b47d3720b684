"""Length modes and output quality end to end through `lipsync-ray run` (tiny-random, faceless clips passed through,
so the frames shown are the source's own) and per catalog row."""

import ffmpeg
import numpy as np
import pytest
from typer.testing import CliRunner

from lipsync_ray.catalog import read_catalog
from lipsync_ray.cli import app
from lipsync_ray.media import load_audio, probe_video

from .conftest import MARK, ffmpeg as run_ffmpeg, marks_shown

ARGS = ["--model", "tiny-random", "--steps", "1", "--detector", "offline", "--on-no-face", "passthrough"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """30 frames (1.2 s) with their number marked; 44.1 kHz stereo speech-like tones of 1.63 s (40.75 frames, not a
    whole number of them) and 0.83 s."""
    d = tmp_path_factory.mktemp("length")
    run_ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=160x64:r=25", "-t", "1.2", "-vf", MARK, "-c:v", "libx264", str(d / "v.mp4"))
    for seconds in ("1.63", "0.83"):
        run_ffmpeg("-f", "lavfi", "-i", f"sine=f=220:r=44100:d={seconds}", "-ac", "2", str(d / f"a{seconds}.m4a"))
    return d


def _run(clip, audio: str, out, *options: str) -> None:
    result = CliRunner().invoke(app, ["run", str(clip / "v.mp4"), str(clip / audio), "-o", str(out), *ARGS, *options])
    assert result.exit_code == 0, result.output


PINGPONG = [*range(30), *range(29, 18, -1)]


@pytest.mark.parametrize("length, audio, marks", [
    ("pingpong", "a1.63.m4a", PINGPONG),  # round(1.63 x 25) = 41 frames, the video forward then backward
    ("loop", "a1.63.m4a", [*range(30), *range(11)]),
    ("cut", "a1.63.m4a", list(range(30))),  # the shorter: the video
    ("silence", "a1.63.m4a", PINGPONG),  # audio longer than the video: as pingpong
    ("silence", "a0.83.m4a", list(range(30))),  # the whole video, audio padded with silence
    ("cut", "a0.83.m4a", list(range(21))),  # round(0.83 x 25) = 21
])
def test_length_modes(clip, tmp_path, length, audio, marks):
    out = tmp_path / "out.mp4"
    _run(clip, audio, out, "--length", length)
    assert marks_shown(out) == marks
    sound = next(s for s in ffmpeg.probe(str(out))["streams"] if s["codec_type"] == "audio")
    assert (int(sound["sample_rate"]), sound["channels"]) == (44_100, 2)  # the input's
    assert abs(float(sound["duration"]) - len(marks) / 25) < 1e-3  # as long as the frames
    if length == "silence" and audio == "a0.83.m4a":
        assert np.abs(load_audio(out)[int(0.9 * 16_000) :]).max() < 1e-3


def test_crf_and_preset_reach_the_encoder(clip, tmp_path):
    sizes = {}
    for crf, preset in (("18", "veryfast"), ("35", "ultrafast")):
        out = tmp_path / f"{crf}.mp4"
        _run(clip, "a0.83.m4a", out, "--crf", crf, "--preset", preset)
        data = out.read_bytes()
        assert f"crf={crf}.0".encode() in data and (b"cabac=0" in data) == (preset == "ultrafast")
        sizes[crf] = probe_video(out).frames, len(data)
    assert sizes["18"][0] == sizes["35"][0] == 21 and sizes["35"][1] < sizes["18"][1]
    result = CliRunner().invoke(app, ["run", str(clip / "v.mp4"), str(clip / "a0.83.m4a"), "-o", str(tmp_path / "x.mp4"), "--preset", "fastest"])
    assert result.exit_code == 2 and "--preset" in result.output


def test_catalog_rows_set_the_length(tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("id,video,audio,length\na,v.mp4,a.wav,loop\nb,v.mp4,a.wav,\n")
    rows = read_catalog(str(catalog), str(tmp_path / "out"))
    assert [r.params for r in rows] == [{"length": "loop"}, {}]
