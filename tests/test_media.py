
import av
import ffmpeg
import numpy as np
import pytest

from lipsync_ray.media import FrameReader, MediaError, VideoWriter, iter_frames, load_audio, probe_video

from .conftest import DATA, ffmpeg as _ffmpeg


def test_probe_and_decode_a_range():
    info = probe_video(DATA / "demo1_video.mp4")
    assert (info.width, info.height, info.fps, info.frames, info.has_audio) == (1080, 1920, 25, 250, True)
    frames = list(iter_frames(DATA / "demo1_video.mp4", 10, 13))
    assert len(frames) == 3 and frames[0].shape == (1920, 1080, 3) and frames[0].dtype == np.uint8


@pytest.mark.parametrize("gop", [10, 1000])
def test_frame_reader_returns_the_right_frames_for_any_reads_and_skips_keyframe_free_gaps(tmp_path, gop):
    """Frames read in a chunked, ping-pong and jumping order equal a plain decode's. A forward jump with no
    keyframe in it decodes on, one past a keyframe seeks: with keyframes every 10 frames, the reader has learnt
    that from the first 30 frames and seeks for each jump of 40 or more; in a single-keyframe video it never seeks forward."""
    video = tmp_path / "v.mp4"
    _ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "6", "-vf", "scale=90:160", "-c:v", "libx264", "-g", str(gop), "-an", str(video))
    with av.open(str(video)) as container:
        truth = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(truth) == 150
    reads = [*range(0, 30), *range(90, 100), *range(99, 80, -1), *range(140, 150), *range(149, 130, -1), 5, 70]
    with FrameReader(video) as reader:
        seeks = []
        seek = reader._seek
        reader._seek = lambda index: (seeks.append((index, reader._next)), seek(index))  # notes, then seeks
        for index in reads:
            np.testing.assert_array_equal(reader[index], truth[index], err_msg=f"frame {index}")
    forward = [index for index, decoder_at in seeks if index >= decoder_at > 0]
    assert forward == ([90, 140, 70] if gop == 10 else []), seeks


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


@pytest.mark.parametrize("rate, channels, seconds, frames", [(44_100, 2, 1.63, 41), (48_000, 1, 1.01, 25), (22_050, 2, 0.5, 30)])
def test_writer_writes_exactly_its_frames_with_the_audio_fitted_at_its_own_rate(tmp_path, rate, channels, seconds, frames):
    """The audio is cut, or padded with silence, to the frames' length; no frame is dropped at the end; the audio
    keeps its sample rate and channels; crf and preset reach x264."""
    audio, out = tmp_path / "a.wav", tmp_path / "o.mp4"
    _ffmpeg("-f", "lavfi", "-i", f"sine=f=300:r={rate}:d={seconds}", "-ac", str(channels), str(audio))
    with VideoWriter(out, 64, 48, audio, crf=30, preset="ultrafast", frames=frames) as writer:
        for i in range(frames):
            writer.write(np.full((48, 64, 3), i * 4, np.uint8))
    assert probe_video(out).frames == frames
    sound = next(s for s in ffmpeg.probe(str(out))["streams"] if s["codec_type"] == "audio")
    assert (int(sound["sample_rate"]), sound["channels"]) == (rate, channels)
    assert abs(float(sound["duration"]) - frames / 25) < 1e-3
    wave = load_audio(out)
    if seconds + 0.1 < frames / 25:
        assert np.abs(wave[int(seconds * 16_000) + 800 :]).max() < 1e-3  # padded with silence
    settings = out.read_bytes()
    assert b"crf=30.0" in settings and b"cabac=0" in settings  # x264's options string: ultrafast turns CABAC off


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
