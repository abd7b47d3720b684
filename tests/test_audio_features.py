import numpy as np
import pytest
import torch

from lipsync_ray.audio import WhisperFeatureEncoder, feature_array, frame_features, frame_indices, upstream_num_frames

from .conftest import load_fixture


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("audio_features.pt")


@pytest.fixture(scope="module")
def encoder(fixture):
    return WhisperFeatureEncoder.from_checkpoint(fixture["whisper_checkpoint"])


@pytest.fixture(scope="module")
def long_waveform(fixture):
    return fixture["long"]["waveform_int16"].numpy().astype(np.float32) / 32768.0


def test_short_clip_reproduces_upstream(fixture, encoder):
    short = fixture["short"]
    features = feature_array(encoder, short["waveform"].numpy(), mode="upstream")
    torch.testing.assert_close(features, short["feature_array"], rtol=1e-4, atol=1e-4)
    n = upstream_num_frames(features.shape[0])
    assert n == short["whisper_chunks"].shape[0] == 89
    assert torch.equal(frame_indices(n, features.shape[0]), short["selected_idx"].long())
    torch.testing.assert_close(frame_features(features, range(n)), short["whisper_chunks"], rtol=1e-4, atol=1e-4)
    # clips that fit one window are identical in both modes
    torch.testing.assert_close(feature_array(encoder, short["waveform"].numpy(), mode="seamless"), features)


def test_long_clip_reproduces_upstream(fixture, encoder, long_waveform):
    long = fixture["long"]
    features = feature_array(encoder, long_waveform, mode="upstream")
    torch.testing.assert_close(features, long["feature_array"], rtol=1e-4, atol=1e-4)
    n = upstream_num_frames(features.shape[0])
    assert n == long["num_chunks"] == 814
    torch.testing.assert_close(frame_features(features, range(740, 761)), long["whisper_chunks_740_760"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(frame_features(features, range(n - 4, n)), long["whisper_chunks_last4"], rtol=1e-4, atol=1e-4)


def _steps(features):
    return (features[1:] - features[:-1]).flatten(1).norm(dim=1)


def test_seamless_features_are_continuous_across_30_seconds(encoder, long_waveform):
    upstream = _steps(feature_array(encoder, long_waveform, mode="upstream"))
    seamless = _steps(feature_array(encoder, long_waveform, mode="seamless"))
    boundary = 1499  # row 1500 = 30.0 s, where upstream's second window starts
    # upstream jumps at the window boundary: its largest step anywhere, several times a typical step
    assert upstream.argmax() == boundary and upstream[boundary] > 3 * upstream.median()
    # seamless: an ordinary step there, and nowhere past the clip's first second a step out of the ordinary
    assert seamless[boundary] < 1.5 * seamless.median()
    assert seamless[50:].max() < 2 * seamless.median()


def test_bad_audio_is_rejected(encoder):
    with pytest.raises(ValueError, match="mono"):
        feature_array(encoder, np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="at least"):
        feature_array(encoder, np.zeros(10, np.float32))


@pytest.mark.parametrize("mode", ["upstream", "seamless"])
def test_a_chunk_gets_exactly_the_whole_clips_rows(encoder, long_waveform, mode):
    from lipsync_ray.audio import feature_rows, mel_ceiling

    whole = feature_array(encoder, long_waveform, mode=mode)
    ceiling = mel_ceiling(long_waveform)
    cache = {}  # the encoded windows that each call leaves for the next
    for rows in [range(0, 40), range(1400, 1560), range(1600, 1625)]:
        for kept in ({}, cache):
            part = feature_rows(encoder, long_waveform, rows, mode=mode, ceiling=ceiling, cache=kept)
            torch.testing.assert_close(part, whole[rows.start : rows.stop], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        feature_rows(encoder, long_waveform, range(1600, 1700), mode=mode)


def test_chunk_features_equal_the_whole_clips_frames(encoder, long_waveform):
    from lipsync_ray.audio import chunk_features, mel_ceiling

    whole = feature_array(encoder, long_waveform)
    part = chunk_features(encoder, long_waveform, range(740, 761), ceiling=mel_ceiling(long_waveform))
    torch.testing.assert_close(part, frame_features(whole, range(740, 761)), rtol=1e-5, atol=1e-5)


def test_chunks_in_order_encode_each_window_once(encoder, long_waveform):
    """The 32.5 s clip has two seamless windows: 25 chunks of 32 frames encode them once each with a shared cache,
    which then holds only the windows the last chunk used."""
    from lipsync_ray.audio import chunk_features, mel_ceiling

    encoded = []
    hook = encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        cache, ceiling = {}, mel_ceiling(long_waveform)
        for start in range(0, 800, 32):
            chunk_features(encoder, long_waveform, range(start, start + 32), ceiling=ceiling, cache=cache)
    finally:
        hook.remove()
    assert sum(encoded) == 2 and list(cache) == [1]
