import json

import pytest
import torch
import torch.nn.functional as F

from lipsync_ray.models import CheckpointMismatchError, UNet3DConditionModel
from lipsync_ray.models.presets import load_unet_config

from .conftest import DATA, SCRIPTS, load_fixture


def _contract_keys(name):
    return {e["key"]: e["shape"] for e in json.loads((DATA / name).read_text())["keys"]}


@pytest.mark.parametrize("variant", ["stage2.yaml", "stage2_512.yaml"])
def test_full_config_state_dict_matches_published_checkpoint(variant):
    expected = _contract_keys("unet_stage2_state_dict.json")
    assert len(expected) == 1246
    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(load_unet_config(variant))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 1_267_099_844


@pytest.fixture(scope="module")
def equivalence():
    return load_fixture("unet_equivalence_A.pt")


def test_reduced_config_keys(equivalence):
    model = UNet3DConditionModel.from_config(equivalence["config"])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == _contract_keys("unet_reduced_A_state_dict.json")


def test_forward_reproduces_upstream(equivalence):
    model = UNet3DConditionModel.from_config(equivalence["config"]).eval()
    model.load_state_dict(equivalence["state_dict"], strict=True)
    with torch.no_grad():
        out = model(equivalence["sample"], equivalence["timestep"], encoder_hidden_states=equivalence["encoder_hidden_states"])
    torch.testing.assert_close(out.sample, equivalence["expected"], rtol=1e-4, atol=1e-4)

    # python-int timestep and (b, f, tokens, dim) audio embeds give the same result
    ehs = equivalence["encoder_hidden_states"].reshape(2, 16, 50, 64)
    with torch.no_grad():
        again = model(equivalence["sample"], int(equivalence["timestep"]), encoder_hidden_states=ehs).sample
    torch.testing.assert_close(again, out.sample, rtol=0, atol=0)


def _tiny_config(**overrides):
    cfg = dict(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
        up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
        norm_num_groups=8,
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=2,
        motion_module_resolutions=[1, 2],
        motion_module_kwargs={"num_attention_heads": 2, "temporal_position_encoding_max_len": 24},
    )
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("frames", [1, 7, 16, 24])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"layers_per_block": 2, "norm_num_groups": 4}, {"block_out_channels": [64, 32], "attention_head_dim": 4}],
)
def test_other_valid_configs_run(frames, overrides):
    torch.manual_seed(0)
    model = UNet3DConditionModel.from_config(_tiny_config(**overrides)).eval()
    sample = torch.randn(2, 13, frames, 8, 8)
    audio = torch.randn(2 * frames, 50, 24)
    with torch.no_grad():
        out = model(sample, torch.tensor(500), encoder_hidden_states=audio).sample
    assert out.shape == (2, 4, frames, 8, 8) and torch.isfinite(out).all()


def test_odd_spatial_size_and_per_sample_timesteps():
    model = UNet3DConditionModel.from_config(_tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 13, 4, 9, 7), torch.tensor([10, 900]), torch.randn(8, 50, 24)).sample
    assert out.shape == (2, 4, 4, 9, 7)


def test_too_many_frames_for_positional_encoding_is_an_error():
    model = UNet3DConditionModel.from_config(_tiny_config()).eval()
    with pytest.raises(ValueError, match="25 frames exceed"):
        model(torch.randn(1, 13, 25, 8, 8), 1, torch.randn(25, 50, 24))


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="use_magic"):
        UNet3DConditionModel.from_config(_tiny_config(use_magic=True))


def test_strict_checkpoint_loading_names_bad_keys(tmp_path):
    model = UNet3DConditionModel.from_config(_tiny_config())
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv_in.bias"]
    path = tmp_path / "latentsync_unet.pt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        model.load_checkpoint(path)
    assert "conv_in.bias" in str(err.value) and "extra.weight" in str(err.value)

    good = tmp_path / "good.pt"
    torch.save({"state_dict": UNet3DConditionModel.from_config(_tiny_config()).state_dict(), "global_step": 7}, good)
    assert model.load_checkpoint(good) == 7


def test_deepcache_shallow_pass_matches_the_full_pass_on_the_same_input():
    """A reuse step fed the features its own full pass cached must give that full pass's output exactly."""
    from lipsync_ray.diffusion import DeepCache

    torch.manual_seed(0)
    unet = UNet3DConditionModel.from_config(load_unet_config("tiny-random.yaml")).eval()
    x, audio = torch.randn(1, 13, 4, 16, 16), torch.randn(4, 50, 64)
    cache = DeepCache(interval=2)
    with torch.no_grad():
        full = unet(x, 500, audio, cache=cache).sample
        assert cache.features is not None
        shallow = unet(x, 500, audio, cache=cache).sample
        refreshed = unet(x, 500, audio, cache=cache).sample
    torch.testing.assert_close(shallow, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(refreshed, full, rtol=0, atol=0)
    assert cache.calls == 3


def test_activations_stay_channels_last_between_blocks(equivalence, monkeypatch):
    """Every convolution, full and DeepCache passes, sees and returns the channels-last frame batch (the spatial
    transformers' 1x1 projections run as GEMMs on its tokens)."""
    model = UNet3DConditionModel.from_config(equivalence["config"]).eval().to(memory_format=torch.channels_last)
    seen = []
    conv2d = torch.nn.functional.conv2d

    def recording(x, *args, **kwargs):
        out = conv2d(x, *args, **kwargs)
        seen.extend(t.is_contiguous(memory_format=torch.channels_last) for t in (x, out))
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    from lipsync_ray.diffusion import DeepCache

    convolutions = sum(
        isinstance(m, torch.nn.Conv2d) and not name.endswith(("proj_in", "proj_out")) for name, m in model.named_modules()
    )
    cache = DeepCache(interval=2)
    with torch.no_grad():
        model(equivalence["sample"][:1, :, :4], 10, torch.randn(4, 50, 64), cache=cache)
        assert len(seen) == 2 * convolutions
        model(equivalence["sample"][:1, :, :4], 10, torch.randn(4, 50, 64), cache=cache)  # DeepCache's shallow pass
    assert cache.calls == 2 and all(seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_frame", [False, True])
def test_frame_batch_group_norm_matches_native_group_norm(dtype, per_frame):
    """Against float64, as accurate as native GroupNorm in each dtype, also with channel means far from zero."""
    from lipsync_ray.models.blocks import group_norm, to_frame_batch

    torch.manual_seed(0)
    b, c, f, groups = 2, 64, 8, 32
    x = torch.randn(b, c, f, 6, 5) + 20 * torch.randn(1, c, 1, 1, 1)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    # upstream: statistics over all frames of a clip (ResNets), or per frame (transformers, motion modules)
    frames = 1 if per_frame else f
    clips = x.transpose(1, 2).reshape(b * f // frames, frames, c, 6, 5).transpose(1, 2)
    ref = F.group_norm(clips.double(), groups, norm.weight.double(), norm.bias.double(), norm.eps)
    native = F.group_norm(clips.to(dtype), groups, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)
    with torch.no_grad():
        ours = group_norm(norm.to(dtype), to_frame_batch(x.to(dtype)), frames)
    ours = ours.reshape(b * f // frames, frames, c, 6, 5).transpose(1, 2)
    assert ours.dtype == dtype
    native_err = (native.double() - ref).abs().max()
    # float32 computes x * scale + shift where native computes (x - mean) * rstd: a few ulps more, 10x under the
    # contract's tolerance; in fp16 and bf16 both round once from float32
    slack = 1e-5 if dtype == torch.float32 else 0.0
    assert (ours.double() - ref).abs().max() <= 1.25 * native_err + slack


# Runs in a subprocess: Triton reads TRITON_INTERPRET when its kernels are defined. Inputs are laid out as the
# motion modules pass them, (pixel, head) pairs strided inside the frame batch; frame counts and head dims include
# ones that tl.dot must pad (5 frames, head dim 40 and 80).
def _interpreted(script: str) -> list[float]:
    """Runs tests/scripts/`script` under Triton's CPU interpreter; the numbers it prints."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script)], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [float(n) for n in done.stdout.split()]


def test_frame_attention_kernel_matches_sdpa():
    worst, module = _interpreted("frame_kernel_check.py")
    assert worst < 4e-3  # fp16 rounding of outputs up to ~3
    assert module < 1e-2  # the whole fp16 module against float32


# GroupNorm: channel means far from zero (the partial statistics' combination must not cancel), channel counts that
# are not powers of two, statistics over whole clips and per frame, with and without SiLU and a frame bias.
# LayerNorm with and without the residual add and the positions by frame; GEGLU; residual add + channel bias; then
# whole fp16 blocks (kernels) and the fused VAE against float32 (PyTorch).
def test_fused_kernels_match_float64():
    worst, module, vae_norms, vae_adds = _interpreted("fused_kernels_check.py")
    assert worst < 1e-3  # fp16 rounding: half an ulp is 4.9e-4 relative
    assert module < 1e-2  # whole fp16 blocks and the VAE (kernels) against float32 (PyTorch forms)
    assert vae_norms == 2 * (4 + 2 + 4 * 2 + 2) + 2  # tiny VAE: 1 and 2 ResNets per level, 2 in each mid block
    assert vae_adds == 4 + 2 + 4 * 2 + 2  # one per ResNet
