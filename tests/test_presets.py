import copy
import json
import time
import tomllib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from lipsync_ray.audio import feature_array, frame_features
from lipsync_ray.models import download as dl
from lipsync_ray.models.presets import (
    VAE_SCALING,
    ModelPreset,
    build_random_components,
    config_path,
    get_preset,
    load_components,
    load_whisper,
    make_scheduler,
)
from lipsync_ray.models.vae import GroupNormSiLU, VAEResnetBlock, fuse_vae

from .conftest import DATA


def test_ddim_matches_upstream_scheduler():
    contract = json.loads((DATA / "ddim_scheduler.json").read_text())
    ddim = make_scheduler("ddim")
    ddim.set_timesteps(20)
    assert ddim.timesteps.tolist() == contract["timesteps"]
    torch.testing.assert_close(
        ddim.alphas_cumprod[ddim.timesteps], torch.tensor(contract["alphas_cumprod_at_timesteps"]), rtol=1e-6, atol=1e-7
    )
    assert ddim.final_alpha_cumprod.item() == pytest.approx(contract["final_alpha_cumprod"])
    # one step follows the documented eta=0 formula
    x, eps = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)
    a_t, a_prev = ddim.alphas_cumprod[951], ddim.alphas_cumprod[901]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    torch.testing.assert_close(ddim.step(eps, 951, x).prev_sample, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)


def test_dpm_solver_uses_the_same_noise_schedule():
    dpm, ddim = make_scheduler("dpm++"), make_scheduler("ddim")
    torch.testing.assert_close(dpm.alphas_cumprod, ddim.alphas_cumprod)
    dpm.set_timesteps(10)
    assert len(dpm.timesteps) == 10
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler")


def test_vae_config_is_sd_vae_ft_mse():
    cfg = json.loads(config_path("vae", "sd-vae-ft-mse.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.scaling_factor == VAE_SCALING == 0.18215


def test_vae_on_fused_kernels_keeps_its_weights_and_output():
    cfg = json.loads(config_path("vae", "sd-vae-ft-mse.json").read_text())
    torch.manual_seed(0)
    plain = AutoencoderKL.from_config(cfg).eval()
    fused = fuse_vae(copy.deepcopy(plain))
    # every ResNet block's two norms and the encoder's and decoder's output norms
    assert sum(isinstance(m, GroupNormSiLU) for m in fused.modules()) == 2 * (2 * 4 + 2 + 3 * 4 + 2) + 2
    assert sum(isinstance(m, VAEResnetBlock) for m in fused.modules()) == 2 * 4 + 2 + 3 * 4 + 2
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = plain.decode(plain.encode(x).latent_dist.mode()).sample
        out = fused.decode(fused.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mode()).sample
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - expected).abs().max() < 1e-4


def test_tiny_random_runs_the_whole_stack_in_seconds():
    start = time.perf_counter()
    c = build_random_components(get_preset("tiny-random"))
    assert "MEANINGLESS" in c.preset.description
    res, frames = c.preset.resolution, 4
    wave = torch.randn(16000).numpy() * 0.1
    audio = frame_features(feature_array(load_whisper(c.preset), wave), range(frames))
    assert audio.shape == (frames, 50, c.unet.config.cross_attention_dim)
    with torch.no_grad():
        image = torch.rand(frames, 3, res, res) * 2 - 1
        latents = c.vae.encode(image).latent_dist.mode() * VAE_SCALING
        assert latents.shape == (frames, 4, res // 8, res // 8)
        lat = latents.permute(1, 0, 2, 3)[None]  # (1, 4, f, h, w)
        mask = torch.ones(1, 1, frames, res // 8, res // 8)
        sample = torch.cat([torch.randn_like(lat), mask, lat, lat], dim=1)
        eps = c.unet(sample, 951, encoder_hidden_states=audio).sample
        decoded = c.vae.decode(eps[0].permute(1, 0, 2, 3) / VAE_SCALING).sample
    assert decoded.shape == (frames, 3, res, res) and torch.isfinite(decoded).all()
    assert time.perf_counter() - start < 60


def test_tiny_random_is_deterministic():
    a = build_random_components(get_preset("tiny-random")).unet.state_dict()
    b = build_random_components(get_preset("tiny-random")).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_weights_are_built_on_the_requested_device():
    """Generate workers build benchmark weights where they run (a GPU), not on their one CPU first."""
    c = load_components("latentsync-1.5-random", device="meta")  # meta: the real sizes, no memory
    assert {p.device.type for m in (c.unet, c.vae) for p in m.parameters()} == {"meta"}
    assert sum(p.numel() for p in c.unet.parameters()) > 800_000_000


def test_published_layout_loads_through_the_real_loader(tmp_path):
    """Write tiny-random weights in the published formats and layout, then load them strictly."""
    tiny = build_random_components(get_preset("tiny-random"), seed=3)
    preset = ModelPreset("custom", 256, "tiny-random.yaml")
    preset.unet_path(tmp_path).parent.mkdir(parents=True)
    torch.save({"state_dict": tiny.unet.state_dict(), "global_step": 5}, preset.unet_path(tmp_path))
    (tmp_path / "whisper").mkdir()
    whisper = load_whisper("tiny-random")
    dims = whisper.dims.__dict__
    whisper_state = {f"encoder.{k}": v for k, v in whisper.encoder.state_dict().items()}
    whisper_state["decoder.token_embedding.weight"] = torch.zeros(1)  # decoder keys are ignored
    torch.save({"dims": dims, "model_state_dict": whisper_state}, tmp_path / "whisper" / "tiny.pt")
    tiny.vae.save_pretrained(tmp_path / "sd-vae-ft-mse")

    loaded = load_components(preset, tmp_path)
    for mine, theirs in [(loaded.unet, tiny.unet), (loaded.vae, tiny.vae), (load_whisper(preset, tmp_path), whisper)]:
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())


def test_missing_weights_name_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="lipsync-ray download"):
        load_components("latentsync-1.6", tmp_path)
    with pytest.raises(ValueError, match="tiny-random"):
        get_preset("latentsync-9")


def test_download_offline_fails_fast_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(dl, "INSIGHTFACE_ZOO", "http://127.0.0.1:9/buffalo_l.zip")
    start = time.perf_counter()
    with pytest.raises(dl.DownloadError) as err:
        dl.download("1.5", tmp_path)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    for name in ["latentsync-1.5/latentsync_unet.pt", "whisper/tiny.pt", "diffusion_pytorch_model.safetensors", "det_10g.onnx"]:
        assert name in message
    assert "tiny-random" in message


def test_cli_download_offline_exit_code(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lipsync_ray.cli import app

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(dl, "INSIGHTFACE_ZOO", "http://127.0.0.1:9/buffalo_l.zip")
    result = CliRunner().invoke(app, ["download", "--version", "1.6", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "latentsync-1.6/latentsync_unet.pt" in result.output


def test_a_checkpoint_path_is_a_model(tmp_path):
    path = tmp_path / "my_unet.pt"
    path.write_bytes(b"")
    preset = get_preset(str(path), resolution=256)
    assert (preset.resolution, preset.unet_config, preset.unet_path(tmp_path)) == (256, "stage2.yaml", path)
    assert get_preset(str(path)).resolution == 512
    assert get_preset("latentsync-1.6", 256).unet_config == "stage2_512.yaml"


def test_real_size_random_presets_have_the_published_architectures():
    """Benchmarks run these: the published U-Net, VAE and whisper-tiny shapes, with random weights."""
    for name, published in [("latentsync-1.5-random", "latentsync-1.5"), ("latentsync-1.6-random", "latentsync-1.6")]:
        preset, real = get_preset(name), get_preset(published)
        assert preset.random_weights and (preset.resolution, preset.unet_config) == (real.resolution, real.unet_config)
        assert (preset.vae_config, preset.whisper_config) == ("sd-vae-ft-mse.json", "tiny.json")
    whisper = load_whisper("latentsync-1.5-random")
    assert (whisper.dims.n_audio_state, whisper.dims.n_audio_layer) == (384, 4)


def test_wheel_ships_every_config_file():
    """A non-editable install once lacked scheduler_config.json: each data file under configs/ must match a
    package-data glob (setuptools globs relative to the package directory)."""
    root = Path(__file__).resolve().parent.parent
    setuptools_cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    configs = root / setuptools_cfg["package-dir"]["lipsync_ray.configs"]
    shipped = {p for pattern in setuptools_cfg["package-data"]["lipsync_ray.configs"] for p in configs.glob(pattern)}
    data_files = {p for p in configs.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    assert data_files, configs
    assert data_files - shipped == set()
