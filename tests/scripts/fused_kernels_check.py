"""The fused Triton kernels against float64 and the float32 PyTorch forms, run under Triton's CPU interpreter by
test_unet: prints the worst errors."""
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
