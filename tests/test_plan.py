from fractions import Fraction

import numpy as np
import pytest

from lipsync_ray.plan import (
    LENGTH_MODES, chunks, fit_audio, output_frame_count, source_frame_map, video_frame_count, window_weights, windows,
)


def test_output_follows_the_audio():
    assert output_frame_count(16_000 * 10) == 250
    assert output_frame_count(153_600) == 240  # demo1_audio: 9.6 s
    # round(seconds x 25), also for audio that is not a whole number of 40 ms frames
    assert [output_frame_count(round(s * 16_000)) for s in (1.01, 1.019, 1.02, 1.03, 2.47)] == [25, 25, 26, 26, 62]
    assert output_frame_count(44_100 * 163 // 100, 44_100) == 41


@pytest.mark.parametrize("length, audio, video, frames", [
    ("pingpong", 40, 30, 40), ("loop", 40, 30, 40), ("cut", 40, 30, 30), ("silence", 40, 30, 40),
    ("pingpong", 20, 30, 20), ("loop", 20, 30, 20), ("cut", 20, 30, 20), ("silence", 20, 30, 30),
])
def test_length_modes_decide_the_frame_count(length, audio, video, frames):
    assert output_frame_count(audio * 640, video_frames=video, length=length) == frames


def test_bad_length_modes_are_refused():
    assert LENGTH_MODES == ("pingpong", "loop", "cut", "silence")
    with pytest.raises(ValueError, match="length must be one of"):
        output_frame_count(16_000, video_frames=25, length="bounce")
    with pytest.raises(ValueError, match="frame count"):
        output_frame_count(16_000, length="cut")


def test_the_stages_audio_is_cut_or_padded_with_silence_to_the_output():
    wave = np.ones(16_000, np.float32)
    assert fit_audio(wave, 20).tolist() == [1.0] * 12_800
    padded = fit_audio(wave, 30)
    assert padded.size == 19_200 and padded[:16_000].min() == 1 and padded[16_000:].max() == 0


def _cfr(frames: int, fps: Fraction) -> tuple[np.ndarray, int, Fraction]:
    """Timestamps of a constant-rate clip in a 1/90000 time base, as a container would store them."""
    tb = Fraction(1, 90_000)
    step = int(1 / fps / tb)
    return np.arange(frames) * step, frames * step, tb


def test_ping_pong_repeats_the_turnaround_frame_like_upstream():
    np.testing.assert_array_equal(source_frame_map(12, *_cfr(5, 25)), [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1])
    np.testing.assert_array_equal(source_frame_map(3, *_cfr(5, 25)), [0, 1, 2])  # shorter audio cuts the video


def test_loop_restarts_the_video():
    np.testing.assert_array_equal(source_frame_map(12, *_cfr(5, 25), "loop"), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    # by time, whatever the frame rate: 50 fps, 8 frames (0.16 s) cover 4 output frames
    np.testing.assert_array_equal(source_frame_map(6, *_cfr(8, 50), "loop"), [0, 2, 4, 6, 0, 2])
    assert video_frame_count(*_cfr(8, 50)) == 4 and video_frame_count(*_cfr(75, Fraction(30))) == 63


def test_each_output_frame_shows_the_source_frame_on_screen_at_its_time():
    m = source_frame_map(250, *_cfr(300, Fraction(30)))
    np.testing.assert_array_equal(m, np.arange(250) * 30 // 25)  # 30 fps: the last frame at or before j/25 s
    np.testing.assert_array_equal(source_frame_map(4, *_cfr(125, Fraction(25, 2))), [0, 0, 1, 1])  # 12.5 fps
    # 30 fps clip of 75 frames (2.5 s): output frames at 0 .. 2.48 s, the 63rd turns around
    assert source_frame_map(64, *_cfr(75, Fraction(30)))[62:].tolist() == [74, 74]
    with pytest.raises(ValueError, match="no frames"):
        source_frame_map(10, np.array([], np.int64), 0, Fraction(1, 25))


def test_variable_rate_gaps_and_a_late_start_follow_the_timestamps():
    """ms time base, start at 5 s: frames at 0, 10, 100 ms, then a gap to 1000 ms, the clip ending at 1040 ms."""
    pts = np.array([5000, 5010, 5100, 6000])
    m = source_frame_map(26, pts, 6040, Fraction(1, 1000))
    assert m[:4].tolist() == [0, 1, 1, 2] and set(m[3:25]) == {2} and m[25] == 3


@pytest.mark.parametrize("n", [1, 5, 16, 17, 28, 29, 40, 241, 1000])
@pytest.mark.parametrize("overlap", [0, 4, 8])
def test_windows_cover_every_frame_with_weights_summing_to_one(n, overlap):
    wins = windows(n, 16, overlap)
    total = np.zeros(n)
    for w, t in zip(wins, window_weights(wins, overlap)):
        assert 0 <= w.start < w.stop <= n and w.stop - w.start <= 16
        assert np.all(t > 0)
        total[w.start : w.stop] += t
    np.testing.assert_allclose(total, 1.0)
    assert all(w.stop - w.start == 16 for w in wins[:-1])


def test_chunks_are_runs_of_the_global_window_grid():
    grid = windows(1000, 16, 4)
    cs = chunks(1000, windows_per_chunk=8, overlap=4)
    assert [w for c in cs for w in c.windows] == grid
    for a, b in zip(cs, cs[1:]):
        assert b.start == a.stop - 4  # neighbours share exactly the window overlap
    assert cs[0].start == 0 and cs[-1].stop == 1000


def test_bad_overlap_is_rejected():
    with pytest.raises(ValueError, match="overlap"):
        windows(100, 16, 9)
