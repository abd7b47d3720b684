"""The Triton frame-attention kernel against SDPA, run under Triton's CPU interpreter by test_unet: prints the worst
error of the kernel and of the whole fp16 module."""
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
