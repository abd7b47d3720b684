import json

import pytest
import torch
import torch.nn.functional as F

from lipsync_ray.models import CheckpointMismatchError, UNet3DConditionModel
from lipsync_ray.models.presets import load_unet_config

from .conftest import DATA, load_fixture


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
FRAME_KERNEL_CHECK = r"""
import torch
import torch.nn.functional as F
from lipsync_ray.models import frame_attention as kernel
from lipsync_ray.models.blocks import TemporalSelfAttention

torch.manual_seed(0)
worst = 0.0
for clips, pixels, heads, frames, dim in [(2, 6, 8, 16, 40), (1, 5, 2, 5, 80), (1, 3, 2, 16, 160)]:
    x = torch.randn(clips, frames, pixels, 3, heads * dim).half()
    q, k, v = (x[:, :, :, i].reshape(clips, frames, pixels * heads, dim).transpose(1, 2) for i in range(3))
    assert kernel.supported(q)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    worst = max(worst, (kernel.attention(q, k, v).float() - expected).abs().max().item())
attention = TemporalSelfAttention(80, 2, max_len=24)
tokens = torch.randn(2 * 16, 6, 80)
expected = attention(tokens, 16)  # float32: SDPA
module = (attention.half()(tokens.half(), 16).float() - expected).abs().max().item() / expected.abs().max().item()
print(worst, module)
"""


def _interpreted(check: str) -> list[float]:
    """Runs `check` under Triton's CPU interpreter; the numbers it prints."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", check], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [float(n) for n in done.stdout.split()]


def test_frame_attention_kernel_matches_sdpa():
    worst, module = _interpreted(FRAME_KERNEL_CHECK)
    assert worst < 4e-3  # fp16 rounding of outputs up to ~3
    assert module < 1e-2  # the whole fp16 module against float32


# GroupNorm: channel means far from zero (the partial statistics' combination must not cancel), channel counts that
# are not powers of two, statistics over whole clips and per frame, with and without SiLU and a frame bias.
# LayerNorm with and without the residual add and the positions by frame; GEGLU; residual add + channel bias; then
# whole fp16 blocks (kernels) and the fused VAE against float32 (PyTorch).
FUSED_KERNELS_CHECK = r"""
import json
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from lipsync_ray.models import fused
from lipsync_ray.models.presets import config_path
from lipsync_ray.models.vae import fuse_vae
from lipsync_ray.models.blocks import AudioTransformerBlock, ResnetBlock3D, TemporalTransformerBlock, to_frame_batch

torch.manual_seed(0)


def error(out, ref):  # relative to fp16 rounding
    return ((out.double() - ref).abs() / (1 + ref.abs())).max().item()


worst = 0.0
for b, c, f, h, w, groups, frames, silu, with_bias in [
    (2, 64, 4, 6, 5, 32, 4, False, False), (1, 96, 4, 3, 7, 32, 1, True, False), (2, 40, 3, 4, 4, 8, 3, True, True)
]:
    x = to_frame_batch(torch.randn(b, c, f, h, w) + 20 * torch.randn(1, c, 1, 1, 1)).half()
    weight, bias = (torch.randn(c) * 0.2 + 1).half(), (torch.randn(c) * 0.2).half()
    frame_bias = torch.randn(b * f, c).half() if with_bias else None
    assert fused.supported(x)
    out = fused.group_norm(x, weight, bias, groups, 1e-5, frames, silu, frame_bias)
    assert out.dtype == x.dtype and out.stride() == x.stride()
    ref = x.double() + (frame_bias.double()[:, :, None, None] if with_bias else 0)
    ref = ref.reshape(b * f // frames, frames, c, h, w).transpose(1, 2)
    ref = F.group_norm(ref, groups, weight.double(), bias.double(), 1e-5).transpose(1, 2).reshape(b * f, c, h, w)
    worst = max(worst, error(out, F.silu(ref) if silu else ref))
for with_delta in (False, True):
    x, delta = torch.randn(3, 7, 80).half() + 5, torch.randn(3, 7, 80).half()
    weight, bias = (torch.randn(80) * 0.2 + 1).half(), (torch.randn(80) * 0.2).half()
    total, out = fused.add_layer_norm(x, delta if with_delta else None, weight, bias, 1e-5)
    expected = x + delta if with_delta else x
    assert torch.equal(total, expected)
    worst = max(worst, error(out, F.layer_norm(expected.double(), (80,), weight.double(), bias.double(), 1e-5)))
x, frame_bias = torch.randn(2 * 3, 5, 80).half(), torch.randn(3, 80).half()  # positions added by frame
weight, bias = (torch.randn(80) * 0.2 + 1).half(), (torch.randn(80) * 0.2).half()
_, out = fused.add_layer_norm(x, None, weight, bias, 1e-5, frame_bias)
expected = F.layer_norm(x.double(), (80,), weight.double(), bias.double(), 1e-5).reshape(2, 3, 5, 80)
worst = max(worst, error(out, (expected + frame_bias.double()[:, None]).reshape(6, 5, 80)))
x, h = (to_frame_batch(torch.randn(1, 48, 3, 5, 4)).half() for _ in range(2))
bias = torch.randn(48).half()
worst = max(worst, error(fused.add_bias(x, h, bias), x.double() + h.double() + bias.double()[:, None, None]))
value, gate = torch.randn(5, 300).half() * 3, torch.randn(5, 300).half() * 3
worst = max(worst, error(fused.geglu(value, gate), value.double() * F.gelu(gate.double())))
module = 0.0
for block, inputs in [
    (ResnetBlock3D(64, 96, 32, groups=32, eps=1e-6), (to_frame_batch(torch.randn(1, 64, 4, 5, 6)), torch.randn(4, 32), 4)),
    (ResnetBlock3D(64, 64, 32, groups=32, eps=1e-6), (to_frame_batch(torch.randn(1, 64, 4, 5, 6)), torch.randn(4, 32), 4)),
    (AudioTransformerBlock(64, 2, 48), (torch.randn(4, 30, 64), torch.randn(4, 7, 48))),
    (TemporalTransformerBlock(64, 2, 2, 24), (torch.randn(2 * 8, 6, 64), 8)),
]:
    expected = block(*inputs)  # float32: the PyTorch forms
    half = block.half()(*(t.half() if isinstance(t, torch.Tensor) else t for t in inputs)).float()
    module = max(module, (half - expected).abs().max().item() / expected.abs().max().item())
calls, adds = [], []  # the VAE's fused norms and residual adds run, not their PyTorch fallbacks
group_norm, add_bias = fused.group_norm, fused.add_bias
fused.group_norm = lambda *args, **kwargs: calls.append(1) or group_norm(*args, **kwargs)
fused.add_bias = lambda *args: adds.append(1) or add_bias(*args)
vae = fuse_vae(AutoencoderKL.from_config(json.loads(config_path("vae", "tiny-random.json").read_text())).eval())
x = (torch.rand(2, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    expected = vae.decode(vae.encode(x).latent_dist.mode()).sample  # float32: PyTorch's GroupNorm and SiLU
    assert not calls and not adds
    vae.half()
    half = vae.decode(vae.encode(x.half()).latent_dist.mode()).sample.float()
module = max(module, (half - expected).abs().max().item() / expected.abs().max().item())
print(worst, module, len(calls), len(adds))
"""


def test_fused_kernels_match_float64():
    worst, module, vae_norms, vae_adds = _interpreted(FUSED_KERNELS_CHECK)
    assert worst < 1e-3  # fp16 rounding: half an ulp is 4.9e-4 relative
    assert module < 1e-2  # whole fp16 blocks and the VAE (kernels) against float32 (PyTorch forms)
    assert vae_norms == 2 * (4 + 2 + 4 * 2 + 2) + 2  # tiny VAE: 1 and 2 ResNets per level, 2 in each mid block
    assert vae_adds == 4 + 2 + 4 * 2 + 2  # one per ResNet
