import numpy as np
import pytest

from lipsync_ray.plan import chunks, frames_at_25fps, output_frame_count, source_frame_map, window_weights, windows


def test_output_follows_the_audio():
    assert output_frame_count(16_000 * 10) == 250
    assert output_frame_count(153_600) == 240  # demo1_audio: 9.6 s


def test_ping_pong_repeats_the_turnaround_frame_like_upstream():
    np.testing.assert_array_equal(source_frame_map(12, 5), [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1])
    np.testing.assert_array_equal(source_frame_map(3, 5), [0, 1, 2])  # shorter audio cuts the video


def test_other_frame_rates_resample_to_25fps():
    assert frames_at_25fps(300, 30.0) == 250
    m = source_frame_map(250, 300, 30.0)
    assert m[0] == 0 and m[-1] <= 299 and np.all(np.diff(m) >= 1) and np.all(np.diff(m) <= 2)
    assert frames_at_25fps(125, 12.5) == 250
    np.testing.assert_array_equal(source_frame_map(4, 125, 12.5), [0, 1, 1, 2])  # each frame shown twice
    with pytest.raises(ValueError, match="no frames"):
        source_frame_map(10, 0)


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
