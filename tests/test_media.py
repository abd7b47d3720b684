import subprocess

import numpy as np
import pytest

from lipsync_ray.media import MediaError, VideoWriter, iter_frames, load_audio, probe_video

from .conftest import DATA


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def test_probe_and_decode_a_range():
    info = probe_video(DATA / "demo1_video.mp4")
    assert (info.width, info.height, info.fps, info.frames, info.has_audio) == (1080, 1920, 25, 250, True)
    frames = list(iter_frames(DATA / "demo1_video.mp4", 10, 13))
    assert len(frames) == 3 and frames[0].shape == (1920, 1080, 3) and frames[0].dtype == np.uint8


def test_audio_is_converted_to_16khz_mono():
    assert load_audio(DATA / "demo1_audio.wav").shape == (153_600,)
    track = load_audio(DATA / "demo1_video.mp4")  # 44.1 kHz stereo AAC inside an mp4
    assert track.dtype == np.float32 and abs(track.size / 16_000 - 10.0) < 0.1


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(MediaError, match="nope.mp4: no such file"):
        probe_video(tmp_path / "nope.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes((DATA / "demo1_video.mp4").read_bytes()[:5000])
    with pytest.raises(MediaError, match="corrupt.mp4"):
        probe_video(corrupt)
    text = tmp_path / "notes.txt"
    text.write_text("not media")
    with pytest.raises(MediaError, match="notes.txt"):
        load_audio(text)
    silent = tmp_path / "silent.wav"
    _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "2", str(silent))
    with pytest.raises(MediaError, match="silent"):
        load_audio(silent)
    empty = tmp_path / "empty.wav"
    _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0.01", str(empty))
    with pytest.raises(MediaError, match="empty"):
        load_audio(empty)


def test_writer_streams_muxes_and_handles_awkward_names(tmp_path):
    out = tmp_path / "it's a \"clip\" – ünïcode.mp4"
    with VideoWriter(out, 270, 480, DATA / "demo1_audio.wav") as writer:
        for frame in iter_frames(DATA / "demo1_video.mp4", 0, 30):
            writer.write(np.ascontiguousarray(frame[::4, ::4]))
    info = probe_video(out)
    assert (info.width, info.height, info.frames, info.fps, info.has_audio) == (270, 480, 30, 25, True)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="does not match"):
        with VideoWriter(out, 64, 64, DATA / "demo1_audio.wav") as writer:
            writer.write(np.zeros((64, 64, 3), np.uint8))
            writer.write(np.zeros((32, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MediaError):
        with VideoWriter(out, 64, 64, tmp_path / "missing.wav") as writer:
            for _ in range(50):
                writer.write(np.zeros((64, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
