import numpy as np
import pytest
import torch

from lipsync_ray.diffusion import DiffusionParams, LipSyncDiffusion, compile_steps, load_mask
from lipsync_ray.audio import chunk_features
from lipsync_ray.models.presets import audio_shape, build_random_components, get_preset, load_whisper
from lipsync_ray.plan import chunks, windows

from .conftest import load_fixture

R = get_preset("tiny-random").resolution


@pytest.fixture(scope="module")
def diffusion():
    return LipSyncDiffusion(build_random_components(get_preset("tiny-random")))


def test_mask_matches_upstream():
    fixture = load_fixture("mask_fixture.pt")
    for res in (256, 512):
        mask = load_mask(res)
        expected = fixture[f"mask_{res}_uint8"].float() / 255.0
        assert (mask - expected).abs().max() <= 1 / 255 + 1e-6
    lat = torch.nn.functional.interpolate(load_mask(256)[None, None], size=(32, 32))
    torch.testing.assert_close(lat[0], fixture["mask_256_latent_32"], atol=1 / 255 + 1e-6, rtol=0)


def test_chunks_reproduce_the_single_run_outside_shared_overlaps(diffusion):
    n, overlap = 36, 4
    rng = np.random.RandomState(0)
    crops = rng.randint(0, 255, (n, R, R, 3), dtype=np.uint8)
    audio = torch.randn(n, 50, 64, generator=torch.Generator().manual_seed(0))
    params = DiffusionParams(steps=2, windows_per_batch=1)
    whole = diffusion.generate(crops, audio, windows(n, 16, overlap), params, overlap)
    assert whole.shape == crops.shape and whole.dtype == np.uint8
    parts = chunks(n, windows_per_chunk=1, overlap=overlap)
    assert len(parts) == 3
    shared = set()
    for a, b in zip(parts, parts[1:]):
        shared |= set(range(b.start, a.stop))
    for chunk in parts:
        out = diffusion.generate(
            crops[chunk.start : chunk.stop], audio[chunk.start : chunk.stop], list(chunk.windows), params, overlap,
            offset=chunk.start,
        )
        own = [f for f in range(chunk.start, chunk.stop) if f not in shared]
        np.testing.assert_array_equal(out[[f - chunk.start for f in own]], whole[own])
    # the upper face (mask == 1) is the reference's
    keep = load_mask(R).numpy() > 0.999
    np.testing.assert_array_equal(whole[:, keep], crops[:, keep])


def test_padded_batches_give_the_same_frames_with_one_unet_batch_shape(diffusion):
    """Compiled runs pad a short last batch so the U-Net compiles once; the padding must not change any frame."""
    n = 40  # 3 windows of 16 with overlap 4: batches of 2 and 1 window(s)
    crops = np.random.RandomState(2).randint(0, 255, (n, R, R, 3), dtype=np.uint8)
    audio = torch.randn(n, 50, 64, generator=torch.Generator().manual_seed(2))
    params = DiffusionParams(steps=2, windows_per_batch=2)
    padded = LipSyncDiffusion(diffusion.c, pad_batches=True)
    batches: list[int] = []
    hook = diffusion.c.unet.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    try:
        plain = diffusion.generate(crops, audio, windows(n, 16, 4), params, 4)
        assert sorted(set(batches)) == [2, 4]  # 1 and 2 windows, both guidance halves
        batches.clear()
        got = padded.generate(crops, audio, windows(n, 16, 4), params, 4)
        assert set(batches) == {4}
    finally:
        hook.remove()
    assert np.abs(got.astype(int) - plain).max() <= 1


def test_warm_up_runs_one_full_unet_batch_of_the_real_audio_shape(diffusion):
    """Generate warms up on a GPU with blank windows: the audio shape must be what Prepare makes, and the U-Net
    must see the batch shape of every later call, so that graphs captured then are the ones replayed."""
    preset = get_preset("tiny-random")
    real = chunk_features(load_whisper(preset), np.zeros(16_000, np.float32), range(0, 3))
    assert tuple(real.shape[1:]) == audio_shape(preset)
    batches: list[tuple] = []
    hook = diffusion.c.unet.register_forward_pre_hook(lambda _, args: batches.append(tuple(args[0].shape)))
    try:
        LipSyncDiffusion(diffusion.c, pad_batches=True).warm_up(DiffusionParams(steps=1, windows_per_batch=2), audio_shape(preset))
    finally:
        hook.remove()
    assert batches == [(4, 13, 16, R // 8, R // 8)]  # 2 windows, both guidance halves


def test_seed_changes_the_result(diffusion):
    crops = np.full((16, R, R, 3), 128, np.uint8)
    audio = torch.zeros(16, 50, 64)
    a = diffusion.generate(crops, audio, windows(16), DiffusionParams(steps=1, seed=1), 4)
    b = diffusion.generate(crops, audio, windows(16), DiffusionParams(steps=1, seed=2), 4)
    assert not np.array_equal(a, b)


def test_deepcache_reuses_deep_features(diffusion):
    n = 16
    rng = np.random.RandomState(1)
    crops = rng.randint(0, 255, (n, R, R, 3), dtype=np.uint8)
    audio = torch.randn(n, 50, 64, generator=torch.Generator().manual_seed(1))
    run = lambda interval: diffusion.generate(crops, audio, windows(n), DiffusionParams(steps=4, deepcache=interval), 4)  # noqa: E731
    exact = run(0)
    np.testing.assert_array_equal(run(1), exact)  # interval 1 refreshes every step: exact
    cached = run(3)
    assert not np.array_equal(cached, exact)
    assert np.abs(cached.astype(int) - exact.astype(int)).mean() < 20  # an approximation of the same result


def test_compiled_unet_steps_are_captured_whole_and_match_eager():
    """torch.compile takes `deep` and `shallow` as single graphs (fullgraph), compiles each variant once for the
    whole denoising loop, and gives eager's output. aot_eager keeps CPU compile time short; the GPU runs
    inductor (benchmarks/diffusion_stage.py reports its precision)."""
    import torch._dynamo

    crops = np.random.RandomState(5).randint(0, 255, (28, R, R, 3), dtype=np.uint8)
    audio = torch.randn(28, 50, 64, generator=torch.Generator().manual_seed(5))
    run = lambda d, interval: d.generate(crops, audio, windows(28), DiffusionParams(steps=4, deepcache=interval), 4)  # noqa: E731
    eager = LipSyncDiffusion(build_random_components(get_preset("tiny-random")))
    expected = [run(eager, 0), run(eager, 3)]

    torch._dynamo.reset()
    compiled = LipSyncDiffusion(build_random_components(get_preset("tiny-random")))
    compile_steps(compiled.c.unet, dynamic=False, fullgraph=True, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    got = [run(compiled, 0), run(compiled, 3)]
    # deep, deep keeping DeepCache's features, shallow: one graph each for the 8 U-Net calls of both runs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_change_no_output():
    components = build_random_components(get_preset("tiny-random"), device="cuda").to("cuda", torch.float16)
    n = 40  # three windows, the last one short: padded
    crops = np.random.RandomState(0).randint(0, 255, (n, R, R, 3), dtype=np.uint8)
    audio = torch.randn(n, 50, 64, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for graphs in (False, True):  # capturing wraps the U-Net's steps in place: eager first
        diffusion = LipSyncDiffusion(components, "cuda", torch.float16, cuda_graphs=graphs, pad_batches=True)
        for deepcache in (0, 3):
            params = DiffusionParams(steps=4, windows_per_batch=2, deepcache=deepcache)
            outputs[graphs, deepcache] = diffusion.generate(crops, audio, windows(n, 16, 4), params, 4)
    for deepcache in (0, 3):
        np.testing.assert_array_equal(outputs[True, deepcache], outputs[False, deepcache])
