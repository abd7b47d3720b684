"""Face restoration with GFPGAN v1.4 (issue 31): the network, its weights and the compositing.

tests/data/gfpgan_v1.4_state_dict.json and tests/data/gfpgan_equivalence.pt are copies of the project's model
contract (its README, section "Face restoration: GFPGAN v1.4"): produced with the `gfpgan` 1.3.8 package's own
GFPGANv1Clean on CPU in fp32, the equivalence fixture's weights being `seeded_weights` below (the contract's
"Seeded test weights"), which the fixture does not store.
"""

import functools
import json
import threading
import time
import zlib
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation
from typer.testing import CliRunner

from lipsync_ray.batch import run_batch
from lipsync_ray.cli import app
from lipsync_ray.config import BatchConfig, LipSyncConfig
from lipsync_ray.enhance import FaceRestorer, five_points, masked_flicker, restoration_masks
from lipsync_ray.faces import FaceAligner
from lipsync_ray.media import FrameReader
from lipsync_ray.models import GFPGAN, CheckpointMismatchError
from lipsync_ray.models import download as dl
from lipsync_ray.models import gfpgan
from lipsync_ray.models.checkpoint import load_state_dict_strict
from lipsync_ray.serve import api, build_app
from lipsync_ray.stages import Compose, Generate, MissingWeights, Prepare, _Restoration, ray_resources, set_up

from .conftest import DATA, ffmpeg, load_fixture


def seeded_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Each tensor from its own generator seeded with the CRC32 of its key, fp32 (int64 zeros for BatchNorm counts)."""
    weights = {}
    for key, shape in shapes.items():
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            weights[key] = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith("running_mean"):
            weights[key] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) <= 1:
            weights[key] = 0.1 * torch.randn(shape, generator=gen) + (1.0 if key.endswith("weight") else 0.0)
        else:
            weights[key] = torch.randn(shape, generator=gen) * (shape[0] / torch.Size(shape).numel()) ** 0.5
    return weights


@pytest.fixture(scope="module")
def equivalence():
    return load_fixture("gfpgan_equivalence.pt")


@pytest.fixture(scope="module")
def reduced(equivalence):
    model = GFPGAN(**equivalence["config"]).eval()
    model.load_state_dict(seeded_weights(equivalence["shapes"]), strict=True)
    return model


def _shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_v14_state_dict_matches_the_published_checkpoint():
    contract = json.loads((DATA / "gfpgan_v1.4_state_dict.json").read_text())
    assert contract["config"] == {**gfpgan.GFPGAN_V14, "decoder_load_path": None, "fix_decoder": False}
    with torch.device("meta"):
        model = GFPGAN(**contract["config"])
    assert len(contract["keys"]) == 285
    assert _shapes(model) == contract["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == 87_143_276
    assert sum(1 for k in contract["keys"] if k.startswith("stylegan_decoder.noises.")) == 15


def test_forward_reproduces_the_gfpgan_package(equivalence, reduced):
    assert _shapes(GFPGAN(**equivalence["config"])) == equivalence["shapes"]
    assert equivalence["forward_kwargs"] == {"return_rgb": True, "randomize_noise": False}
    with torch.no_grad():
        image, out_rgbs = reduced(equivalence["input"])
        alone = reduced(equivalence["input"][1:], return_rgb=False)
    torch.testing.assert_close(image, equivalence["image"], rtol=1e-4, atol=1e-4)
    assert len(out_rgbs) == len(equivalence["out_rgbs"]) == 4
    for got, expected in zip(out_rgbs, equivalence["out_rgbs"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # a sample's result does not depend on its batch, and the noise is the stored one every time
    assert alone[1] == []
    torch.testing.assert_close(alone[0], image[1:], rtol=1e-5, atol=1e-5)


def test_the_other_constructor_options_run():
    """SFT on all channels, one style code for every layer, styles through the MLP (GFPGAN v1.2's style)."""
    model = GFPGAN(out_size=32, num_style_feat=16, channel_multiplier=1, narrow=0.125)
    image, out_rgbs = model(torch.zeros(2, 3, 32, 32))
    assert image.shape == (2, 3, 32, 32) and [r.shape[-1] for r in out_rgbs] == [8, 16, 32]
    assert not any(p.requires_grad for p in model.stylegan_decoder.parameters())  # fix_decoder


def _checkpoint(tmp_path, blob):
    path = gfpgan.gfpgan_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


@pytest.fixture
def reduced_preset(monkeypatch, equivalence):
    """The `gfpgan` preset with the equivalence fixture's reduced config: a full-size checkpoint is 350 MB."""
    monkeypatch.setitem(gfpgan.RESTORERS, "gfpgan", replace(gfpgan.RESTORERS["gfpgan"], config=equivalence["config"]))


def test_checkpoint_loads_params_ema_else_params(tmp_path, reduced_preset, reduced):
    state = reduced.state_dict()
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    _checkpoint(tmp_path, {"params_ema": state, "params": shifted})
    loaded = gfpgan.load_restorer("gfpgan", tmp_path)
    assert not loaded.training
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    _checkpoint(tmp_path, {"params": shifted})
    loaded = gfpgan.load_restorer("gfpgan", tmp_path)
    assert all(torch.equal(v, shifted[k]) for k, v in loaded.state_dict().items())

    path = _checkpoint(tmp_path, {"state_dict": state})
    with pytest.raises(CheckpointMismatchError, match="params_ema.*found state_dict"):
        gfpgan.read_gfpgan_checkpoint(path)


def test_strict_load_names_the_bad_keys(tmp_path, reduced_preset, reduced):
    state = dict(reduced.state_dict())
    del state["stylegan_decoder.noises.noise3"]
    state["stylegan_decoder.style_mlp.17.weight"] = torch.zeros(1)
    state["final_linear.bias"] = torch.zeros(7)
    path = _checkpoint(tmp_path, {"params_ema": state})
    with pytest.raises(CheckpointMismatchError) as err:
        gfpgan.load_restorer("gfpgan", tmp_path)
    message = str(err.value)
    for name in [str(path), "stylegan_decoder.noises.noise3", "stylegan_decoder.style_mlp.17.weight", "final_linear.bias (7,)"]:
        assert name in message
    with pytest.raises(CheckpointMismatchError, match="noise3"):
        load_state_dict_strict(GFPGAN(**gfpgan.RESTORERS["gfpgan"].config), state, "params")


def test_missing_weights_name_the_file_and_the_download_command(tmp_path):
    expected = str(tmp_path / "gfpgan" / "GFPGANv1.4.pth")
    for attempt in [lambda: gfpgan.restorer_weights("gfpgan", tmp_path), FaceRestorer("gfpgan", tmp_path).setup]:
        with pytest.raises(FileNotFoundError) as err:
            attempt()
        assert expected in str(err.value) and "lipsync-ray download --enhance" in str(err.value)
    assert gfpgan.restorer_weights("tiny-random", tmp_path) is None
    with pytest.raises(ValueError, match="tiny-random"):
        FaceRestorer("codeformer")


def test_download_offline_fails_fast_naming_the_url_and_the_place(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/GFPGANv1.4.pth"  # nothing listens there
    monkeypatch.setattr(dl, "GFPGAN_URL", url)
    start = time.perf_counter()
    with pytest.raises(dl.DownloadError) as err:
        dl.download_enhance(tmp_path)
    assert time.perf_counter() - start < 10
    assert url in str(err.value) and str(gfpgan.gfpgan_path(tmp_path)) in str(err.value)

    result = CliRunner().invoke(app, ["download", "--enhance", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert url in result.output and "GFPGANv1.4.pth" in result.output


def test_download_fetches_into_the_checkpoints_layout(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"params_ema": {"w": torch.ones(2)}}, served / "GFPGANv1.4.pth")
    (served / "error_page.pth").write_text("<html>rate limited</html>")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        monkeypatch.setattr(dl, "GFPGAN_URL", f"{base}/error_page.pth")
        with pytest.raises(dl.DownloadError, match="error_page.pth"):
            dl.download_enhance(tmp_path / "ckpt")
        assert not any((tmp_path / "ckpt").rglob("*.pth*"))  # nothing half-downloaded or wrong left behind

        monkeypatch.setattr(dl, "GFPGAN_URL", f"{base}/GFPGANv1.4.pth")
        path = dl.download_enhance(tmp_path / "ckpt")
        assert path == tmp_path / "ckpt" / "gfpgan" / "GFPGANv1.4.pth"
        assert path.read_bytes() == (served / "GFPGANv1.4.pth").read_bytes()
        (served / "GFPGANv1.4.pth").unlink()
        assert dl.download_enhance(tmp_path / "ckpt") == path  # present: nothing fetched
    finally:
        server.shutdown()
        server.server_close()


# -- restoring frames ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene():
    """Two consecutive 600x600 frames of demo1 with their alignment (the face alignment contract's fixture),
    their five FFHQ points and restoration masks."""
    contract = load_fixture("align_restore.pt")
    frames = torch.stack(contract["frames"]).numpy()
    aligner = FaceAligner(256)
    matrices, _ = aligner.estimate(torch.stack(contract["landmarks3"]).numpy())
    return frames, five_points(aligner, matrices), restoration_masks(aligner, matrices, *frames.shape[1:3])


@pytest.fixture(scope="module")
def restorer():
    restorer = FaceRestorer("tiny-random")
    restorer.setup()
    return restorer


def test_masks_cover_the_regenerated_lower_face_only(scene):
    frames, points, masks = scene
    assert masks.shape == frames.shape[:3] and masks.dtype == np.uint8 and masks.max() == 255
    for mask, (eye_l, eye_r, nose, mouth_l, mouth_r) in zip(masks, points.round().astype(int)):
        assert mask[mouth_l[1], mouth_l[0]] > 0 and mask[mouth_r[1], mouth_r[0]] > 0
        for x, y in (eye_l, eye_r):
            assert mask[y - 15 : y + 15, x - 15 : x + 15].max() == 0
        rows = np.flatnonzero(mask.any(1))
        assert rows.min() > (eye_l[1] + eye_r[1]) / 2 and rows.max() < frames.shape[1] - 100


def test_only_pixels_inside_the_mask_change(scene, restorer):
    frames, points, masks = scene
    out = restorer(frames, points, masks, strength=1.0)
    assert out.shape == frames.shape and out.dtype == np.uint8
    outside = masks == 0
    assert np.array_equal(out[outside], frames[outside])
    assert (out != frames).any(-1).sum() > 0.5 * (masks > 128).sum()


def test_output_is_deterministic(scene, restorer):
    frames, points, masks = scene
    first = restorer(frames, points, masks, 0.5)
    again = FaceRestorer("tiny-random", batch_size=1)
    again.setup()
    assert np.array_equal(first, restorer(frames, points, masks, 0.5))
    assert np.abs(first.astype(int) - again(frames, points, masks, 0.5)).max() <= 1  # batch size: float rounding


def test_strength_zero_returns_the_generated_frames(scene, restorer):
    frames, points, masks = scene
    assert np.array_equal(restorer(frames, points, masks, 0.0), frames)
    assert np.array_equal(restorer(frames, points, np.zeros_like(masks), 1.0), frames)
    with pytest.raises(ValueError, match="0..1"):
        restorer(frames, points, masks, 1.5)


def test_warping_to_the_template_and_back_keeps_the_face_in_place(scene, monkeypatch):
    """A restorer that returns its input: the frame comes back up to the blur of two bilinear warps."""
    frames, points, masks = scene
    identity = FaceRestorer("tiny-random")
    identity.setup()
    monkeypatch.setattr(identity, "model", lambda x, return_rgb: (x, []))
    out = identity(frames, points, masks, 1.0)
    inside = masks > 0
    assert np.abs(out.astype(int) - frames)[inside].mean() < 3


def test_a_static_face_stays_static(scene, restorer):
    """Fixed noise: identical frames restore identically, so restoration adds no flicker to a still face."""
    frames, points, masks = scene
    still = np.repeat(frames[:1], 4, axis=0)
    out = restorer(still, np.repeat(points[:1], 4, axis=0), np.repeat(masks[:1], 4, axis=0), 1.0)
    assert masked_flicker(out, np.repeat(masks[:1], 4, axis=0)) == 0.0
    assert masked_flicker(frames, masks) > 0


# -- on every path: run, the bulk job (tests/test_batch.py) and Serve (tests/test_serve.py) -----------------------
TINY_RUN = ["--model", "tiny-random", "--steps", "1", "--detector", "offline"]


def test_compose_restores_faces_only_inside_the_mask(scene):
    """Compose's paste-back with restoration: the frames pasted without it, changed only inside the restoration
    masks, the same on every call; a frame without a face is left alone."""
    cfg = LipSyncConfig(model="tiny-random", enhance="tiny-random", enhance_strength=1.0)
    compose = set_up(Compose, cfg)
    frames, _, _ = scene
    frames = [*frames, frames[0]]
    matrices = compose.aligner.estimate(torch.stack(load_fixture("align_restore.pt")["landmarks3"]).numpy())[0].numpy()
    crops = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    group = [(i, crops[i], i < 2, matrices[min(i, 1)]) for i in range(3)]
    restoration = _Restoration.of(cfg, compose.aligner, "cpu")
    plain = compose._paste(group, [f.copy() for f in frames])
    restored = compose._paste(group, [f.copy() for f in frames], restoration)
    masks = restoration_masks(compose.aligner, torch.from_numpy(matrices), *frames[0].shape[:2])
    for before, after, mask in zip(plain[:2], restored[:2], masks):
        assert np.array_equal(after[mask == 0], before[mask == 0])
        assert (after != before).any(-1).sum() > 0.5 * (mask > 128).sum()
    assert np.array_equal(restored[2], frames[2])
    again = compose._paste(group, [f.copy() for f in frames], restoration)
    assert all(np.array_equal(a, b) for a, b in zip(again, restored)) and restoration.seconds > 0
    assert _Restoration.of(cfg.with_params({"enhance": "none"}), compose.aligner, "cpu") is None


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enhance_clip")
    ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "1.2", "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(folder / "v.mp4"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "1.2", str(folder / "a.wav"))
    return folder


def _frames(path) -> np.ndarray:
    with FrameReader(path) as reader:
        return np.stack([reader[i] for i in range(reader.frames)]).astype(int)


def test_run_with_enhance_changes_the_lower_face_only(clip, tmp_path):
    outputs = {}
    for name, extra in (("plain", []), ("restored", ["--enhance", "tiny-random", "--enhance-strength", "1"])):
        outputs[name] = tmp_path / f"{name}.mp4"
        result = CliRunner().invoke(app, ["run", str(clip / "v.mp4"), str(clip / "a.wav"), "-o", str(outputs[name]), *TINY_RUN, *extra])
        assert result.exit_code == 0, result.output
    source, plain, restored = _frames(clip / "v.mp4")[:30], _frames(outputs["plain"]), _frames(outputs["restored"])
    lip_synced = binary_dilation(np.abs(plain - source).max(-1) > 12, np.ones((1, 3, 3), bool), iterations=4)
    change = np.abs(restored - plain).max(-1)
    assert (change > 40).sum() > 30 * 200 and not (change > 40)[~lip_synced].any()  # only where lip-sync changed it
    assert change[~lip_synced].mean() < 1  # elsewhere the noise of encoding another picture


def test_missing_weights_exit_2_before_any_video_work(clip, tmp_path, monkeypatch):
    def no_video_work(*args, **kwargs):
        raise AssertionError("video work started")

    monkeypatch.setattr("lipsync_ray.pipeline.LipSyncPipeline.__init__", no_video_work)
    monkeypatch.setattr("lipsync_ray.batch.run_batch", no_video_work)
    expected = str(tmp_path / "gfpgan" / "GFPGANv1.4.pth")
    for command in (
        ["run", str(clip / "v.mp4"), str(clip / "a.wav"), "-o", str(tmp_path / "o.mp4")],
        ["batch", "--catalog", str(tmp_path / "c.csv"), "--output", str(tmp_path / "out")],
    ):
        result = CliRunner().invoke(app, [*command, *TINY_RUN, "--enhance", "gfpgan", "--checkpoints", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "lipsync-ray download --enhance" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_catalog_row_asking_for_missing_weights_stops_the_job_before_it_starts(clip, tmp_path):
    catalog = tmp_path / "catalog.csv"
    rows = [f"{name},{clip / 'v.mp4'},{clip / 'a.wav'},{enhance}" for name, enhance in (("plain", "none"), ("restored", "gfpgan"))]
    catalog.write_text("\n".join(["id,video,audio,enhance", *rows]) + "\n")
    job = BatchConfig(catalog=str(catalog), output=str(tmp_path / "out"), pipeline=LipSyncConfig(model="tiny-random", checkpoints=str(tmp_path)))
    with pytest.raises(MissingWeights, match="lipsync-ray download --enhance"):
        run_batch(job)  # no Ray: it stops before connecting to one
    assert not (tmp_path / "out").exists()


def test_serve_refuses_to_deploy_a_restoring_service_without_weights(tmp_path):
    with pytest.raises(MissingWeights, match="GFPGANv1.4.pth"):
        build_app({"pipeline": {"model": "tiny-random", "enhance": "gfpgan", "checkpoints": str(tmp_path)}, "gpu": False})


def test_the_ray_job_and_serve_restore_on_a_share_of_the_gpu():
    assert ray_resources(Compose, gpu=True) == {"num_cpus": 1}
    assert ray_resources(Compose, gpu=True, restoring=True) == {"num_cpus": 1, "num_gpus": 0.25}
    assert ray_resources(Generate, gpu=True, restoring=True) == {"num_cpus": 1, "num_gpus": 0.75}
    assert ray_resources(Compose, gpu=False, restoring=True) == ray_resources(Prepare, gpu=False, restoring=True) == {"num_cpus": 1}


def test_the_openapi_docs_list_the_restoration_fields():
    spec = api.openapi()
    for route in ("/v1/lipsync", "/v1/jobs"):
        content = spec["paths"][route]["post"]["requestBody"]["content"]
        for kind in ("multipart/form-data", "application/json"):
            fields = content[kind]["schema"]["properties"]
            assert fields["enhance"]["anyOf"][0]["enum"] == ["none", "gfpgan", "tiny-random", "gfpgan-random"]
            assert "GFPGAN" in fields["enhance"]["description"]
            assert (fields["enhance_strength"]["anyOf"][0]["minimum"], fields["enhance_strength"]["anyOf"][0]["maximum"]) == (0, 1)
