"""Lip-sync scoring: SyncNet (models/syncnet.py), its scores and face crops (eval.py), `lipsync-ray eval`.

tests/data/syncnet_v2_state_dict.json and tests/data/syncnet_equivalence.pt are copied unchanged from the
project's compatibility contract: produced with the syncnet-python 0.2.3 package's `S(num_layers_in_fc_layers=1024)`
and `SyncNetInstance.evaluate` (the code behind published LSE-D / LSE-C numbers) on CPU in fp32, with the
contract's seeded test weights (`seeded_weights`, shared with the GFPGAN fixtures' tests).
"""

import json
import shutil
import time

import cv2
import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.signal import medfilt
from typer.testing import CliRunner

from lipsync_ray.cli import app
from lipsync_ray.config import LipSyncConfig
from lipsync_ray.eval import FaceTrack, SyncScorer, chunk_seams, face_crops, face_tracks, sync_features, sync_score
from lipsync_ray.faces import Face
from lipsync_ray.media import FrameReader
from lipsync_ray.models import CheckpointMismatchError, SyncNet
from lipsync_ray.models import download as dl
from lipsync_ray.models.syncnet import load_syncnet, mfcc, syncnet_path
from lipsync_ray.stages import SPEAKER_SECONDS, Prepare, find_speaker, plan_video, set_up, sync_scorer

from .conftest import DATA, ffmpeg, load_fixture, loopback_http
from .test_enhance import seeded_weights

EVAL = ["--model", "tiny-random", "--detector", "offline"]


def _contract_keys() -> dict[str, list[int]]:
    return json.loads((DATA / "syncnet_v2_state_dict.json").read_text())["keys"]


def test_syncnet_has_the_published_state_dict():
    with torch.device("meta"):
        model = SyncNet()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got.items()) == list(_contract_keys().items())
    assert len(got) == 102 and sum(v.numel() for v in model.state_dict().values()) == 13_640_270


@pytest.fixture(scope="module")
def equivalence():
    return load_fixture("syncnet_equivalence.pt")


@pytest.fixture(scope="module")
def seeded_syncnet():
    model = SyncNet().eval()
    model.load_state_dict(seeded_weights(_contract_keys()), strict=True)
    return model


def test_mfcc_matches_python_speech_features(equivalence):
    got = torch.from_numpy(mfcc(equivalence["audio_int16"].numpy()))
    torch.testing.assert_close(got, equivalence["mfcc"], rtol=1e-4, atol=1e-4)


def test_sync_score_reproduces_syncnet_python(equivalence, seeded_syncnet):
    frames, audio = equivalence["frames_bgr"].numpy(), equivalence["audio_int16"].numpy()
    score = sync_score(seeded_syncnet, frames, audio, vshift=equivalence["vshift"])
    torch.testing.assert_close(torch.from_numpy(score.mean_dists), equivalence["mean_dists"], rtol=1e-4, atol=1e-4)
    assert score.offset == equivalence["offset"]
    assert score.conf == pytest.approx(equivalence["conf"], rel=1e-4, abs=1e-4)
    assert score.min_dist == pytest.approx(equivalence["min_dist"], rel=1e-4, abs=1e-4)
    assert score.frame_conf.shape == (40,) and np.isfinite(score.frame_conf).all()


def test_features_do_not_depend_on_batching(equivalence, seeded_syncnet):
    """Frames from a generator, 7 windows a call: the features syncnet_python computed 20 windows a call."""
    frames = (frame for frame in equivalence["frames_bgr"].numpy())
    lips, sound = sync_features(seeded_syncnet, frames, equivalence["audio_int16"].numpy(), batch_size=7)
    torch.testing.assert_close(lips, equivalence["lip_features"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sound, equivalence["audio_features"], rtol=1e-4, atol=1e-4)


def test_checkpoint_loads_strictly_and_bad_keys_are_named(tmp_path):
    path = syncnet_path(tmp_path)
    path.parent.mkdir()
    state = seeded_weights(_contract_keys())
    torch.save(state, path)
    model = load_syncnet("syncnet-v2", tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    bad = dict(state)
    del bad["netfclip.3.bias"]
    bad["netfclip.4.weight"] = torch.zeros(1)
    bad["netcnnaud.0.weight"] = torch.zeros(64, 1, 3, 4)
    torch.save(bad, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_syncnet("syncnet-v2", tmp_path)
    for name in ["netfclip.3.bias", "netfclip.4.weight", "netcnnaud.0.weight (64, 1, 3, 4) != (64, 1, 3, 3)"]:
        assert name in str(err.value)
    path.write_text("<html>moved</html>")
    with pytest.raises(CheckpointMismatchError, match="not a PyTorch state dict"):
        load_syncnet("syncnet-v2", tmp_path)


def test_missing_weights_name_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="lipsync-ray download --eval") as err:
        load_syncnet("syncnet-v2", tmp_path)
    assert str(syncnet_path(tmp_path)) in str(err.value)
    with pytest.raises(ValueError, match="tiny-random"):
        load_syncnet("syncnet-v9")
    result = CliRunner().invoke(app, ["eval", str(DATA / "demo1_video.mp4"), "--checkpoints", str(tmp_path)])
    assert result.exit_code == 2 and "lipsync-ray download --eval" in result.output


def test_download_eval_offline_fails_fast_naming_url_and_path(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/syncnet_v2.model"  # nothing listens there
    monkeypatch.setattr(dl, "SYNCNET_URL", url)
    start = time.perf_counter()
    with pytest.raises(dl.DownloadError) as err:
        dl.download_syncnet(tmp_path)
    assert time.perf_counter() - start < 10
    assert url in str(err.value) and str(syncnet_path(tmp_path)) in str(err.value)
    result = CliRunner().invoke(app, ["download", "--eval", "--root", str(tmp_path)])
    assert result.exit_code == 2 and url in result.output


def test_download_eval_keeps_only_a_loadable_model(tmp_path, monkeypatch):
    served, root = tmp_path / "served", tmp_path / "checkpoints"
    served.mkdir()
    (served / "moved.html").write_text("<html>moved</html>")
    torch.save(seeded_weights(_contract_keys()), served / "syncnet_v2.model")
    with loopback_http(served) as base:
        monkeypatch.setattr(dl, "SYNCNET_URL", f"{base}/files/moved.html")
        with pytest.raises(dl.DownloadError, match="fetching SyncNet v2 failed"):
            dl.download_syncnet(root)
        assert not [p for p in root.rglob("*") if p.is_file()]
        monkeypatch.setattr(dl, "SYNCNET_URL", f"{base}/files/syncnet_v2.model")
        assert dl.download_syncnet(root) == syncnet_path(root)
    load_syncnet("syncnet-v2", root)


def _face(x: float, y: float, size: float = 100) -> Face:
    points = np.array([[x + 30, y + 30], [x + 70, y + 30], [x + 50, y + 60]], float)
    return Face(np.array([x, y, x + size, y + size], float), 0.9, points)


def test_face_tracks_link_overlapping_boxes_and_fill_gaps():
    detections = []
    for i in range(40):
        faces = [_face(100 + 2 * i, 100)] if not 10 <= i < 15 else []  # moving, unseen for 5 frames
        faces += [_face(400, 100, 80)] if 5 <= i < 25 else []  # smaller, 20 frames
        faces += [_face(700, 300)] if 30 <= i < 33 else []  # too short to score
        detections.append(faces)
    tracks = face_tracks(detections)
    assert [(t.start, t.stop) for t in tracks] == [(0, 40), (5, 25)]
    np.testing.assert_allclose(tracks[0].boxes[12], [124, 100, 224, 200])
    np.testing.assert_allclose(tracks[0].points[12], _face(124, 100).points)


def test_face_crops_follow_the_published_geometry():
    """The contract's steps, literally: half-side and centre median-filtered over 13 frames, the frame padded by
    int(1.8 half-side) with grey 110, rows y - s .. y + 1.8 s and columns x - 1.4 s .. x + 1.4 s of the padded
    frame, resized to 224 (cv2's default), BGR. The box reaches above the frame: the crop's top is grey."""
    import cv2

    frames = np.random.default_rng(0).integers(0, 256, (20, 240, 320, 3), np.uint8)
    boxes = np.array([[150 + i, -20, 250 + i, 100 + i / 2] for i in range(20)], float)
    crops = list(face_crops(frames, FaceTrack(0, boxes, np.zeros((20, 3, 2)))))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    s = medfilt(np.maximum(w, h) / 2, 13)
    x, y = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, 13), medfilt((boxes[:, 1] + boxes[:, 3]) / 2, 13)
    for i, crop in enumerate(crops):
        pad = int(s[i] * 1.8)
        padded = np.pad(frames[i][..., ::-1], ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
        my, mx = y[i] + pad, x[i] + pad
        face = padded[int(my - s[i]) : int(my + s[i] * 1.8), int(mx - s[i] * 1.4) : int(mx + s[i] * 1.4)]
        np.testing.assert_array_equal(crop, cv2.resize(face, (224, 224)))
    assert (crops[10][:20] == 110).all() and crops[10].shape == (224, 224, 3)


def test_chunk_seams_are_the_frames_chunks_share():
    assert chunk_seams(50, windows_per_chunk=1, overlap=4) == [(12, 16), (24, 28), (36, 40)]
    assert chunk_seams(50, windows_per_chunk=8) == []
    assert chunk_seams(64, windows_per_chunk=2, overlap=0) == [(32, 32)]


@pytest.fixture(scope="module")
def lipsynced(tmp_path_factory):
    """original.mp4 (a 2 s cut of demo1, no audio track), speech.wav, and outputs/original.mp4: its tiny-random
    lip-sync, in chunks of one window (a chunk seam every 12 frames)."""
    folder = tmp_path_factory.mktemp("eval")
    ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "2", "-vf", "scale=270:480", "-c:v", "libx264", "-an",
           str(folder / "original.mp4"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "2", str(folder / "speech.wav"))
    result = CliRunner().invoke(app, [
        "run", str(folder / "original.mp4"), str(folder / "speech.wav"), "-o", str(folder / "outputs" / "original.mp4"),
        "--model", "tiny-random", "--steps", "1", "--detector", "offline", "--windows-per-chunk", "1",
    ])
    assert result.exit_code == 0, result.output
    return folder


NUMBER = {"type": "number"}
SCORES_SCHEMA = {
    "type": "object",
    "required": ["video", "lse_c", "lse_d", "av_offset", "frames", "face_start", "face_stop", "model", "chunk_seams",
                 "frame_conf", "reference", "psnr_outside_mask", "ssim_outside_mask", "jitter_seams", "jitter_inside"],
    "properties": {
        "video": {"type": "string"}, "reference": {"type": "string"}, "model": {"enum": ["tiny-random"]},
        "lse_c": NUMBER, "lse_d": {"type": "number", "exclusiveMinimum": 0},
        "av_offset": {"type": "integer", "minimum": -15, "maximum": 15},
        "frames": {"const": 50}, "face_start": {"const": 0}, "face_stop": {"const": 50},
        "chunk_seams": {"const": [[12, 16], [24, 28], [36, 40]]},
        "frame_conf": {"type": "array", "minItems": 50, "maxItems": 50, "items": {"type": ["number", "null"]}},
        "psnr_outside_mask": {"type": "number", "minimum": 30}, "ssim_outside_mask": {"type": "number", "minimum": 0.9, "maximum": 1},
        "jitter_seams": {"type": "number", "exclusiveMinimum": 0}, "jitter_inside": {"type": "number", "exclusiveMinimum": 0},
    },
}


def test_eval_cli_scores_an_output_against_its_original(lipsynced, tmp_path):
    out = lipsynced / "outputs" / "original.mp4"
    result = CliRunner().invoke(app, [
        "eval", str(out), "--reference", str(lipsynced / "original.mp4"), "--json", str(tmp_path / "scores.json"),
        "--plot", str(tmp_path / "conf.png"), "--windows-per-chunk", "1", *EVAL,
    ])
    assert result.exit_code == 0, result.output
    assert all(word in result.output for word in ["LSE-D", "LSE-C", "AV offset", "PSNR", "SSIM", "mean nothing"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    jsonschema.validate(scores, SCORES_SCHEMA)
    # one value per 5-frame window (n - 5 of them, syncnet_python's count), at the window's centre frame
    assert [i for i, c in enumerate(scores["frame_conf"]) if c is not None] == list(range(2, 47))
    assert (tmp_path / "conf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(tmp_path / "conf.png").size == (1000, 300)


def test_eval_cli_with_separate_audio_and_an_unchanged_video(lipsynced, tmp_path):
    original = lipsynced / "original.mp4"
    result = CliRunner().invoke(app, ["eval", str(original), *EVAL])
    assert result.exit_code == 2 and f"{original}: has no audio track" in result.output
    result = CliRunner().invoke(app, [
        "eval", str(original), str(lipsynced / "speech.wav"), "--reference", str(original),
        "--json", str(tmp_path / "scores.json"), *EVAL,
    ])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["psnr_outside_mask"] is None  # identical: infinite
    assert (scores["ssim_outside_mask"], scores["jitter_inside"]) == (1.0, 0.0)


def test_eval_cli_on_a_folder_of_outputs(lipsynced, tmp_path):
    outputs, originals = tmp_path / "outputs", tmp_path / "originals"
    outputs.mkdir()
    originals.mkdir()
    for name in ("original.mp4", "orphan.mp4"):
        shutil.copy(lipsynced / "outputs" / "original.mp4", outputs / name)
    (outputs / "broken.mp4").write_text("not a video")
    (outputs / "notes.txt").write_text("not scored")
    for name in ("original.mp4", "broken.mp4"):
        shutil.copy(lipsynced / "original.mp4", originals / name)
    result = CliRunner().invoke(app, [
        "eval", str(outputs), "--reference", str(originals), "--json", str(tmp_path / "rows.json"),
        "--parquet", str(tmp_path / "rows.parquet"), "--plot", str(tmp_path / "plots"), *EVAL,
    ])
    assert result.exit_code == 1, result.output  # some videos failed
    assert "original.mp4" in result.output and "1 of 3 videos scored" in result.output
    broken, scored, orphan = json.loads((tmp_path / "rows.json").read_text())
    assert broken["error"].startswith(f"{outputs / 'broken.mp4'}: not a readable video")
    assert orphan["error"] == f"{outputs / 'orphan.mp4'}: no original named orphan.* in {originals}"
    assert scored["error"] == "" and scored["reference"] == str(originals / "original.mp4")
    table = pd.read_parquet(tmp_path / "rows.parquet")
    assert list(table.video) == [str(outputs / name) for name in ("broken.mp4", "original.mp4", "orphan.mp4")]
    assert {"lse_c", "lse_d", "av_offset", "psnr_outside_mask", "jitter_seams", "error"} <= set(table.columns)
    assert table.lse_c.iloc[1] == pytest.approx(scored["lse_c"]) and np.isnan(table.lse_c.iloc[0])
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["original.png"]


@pytest.mark.parametrize("args, message", [
    (["missing.mp4"], "missing.mp4: no such file or folder"),
    (["{folder}", "{folder}/speech.wav"], "against their own audio"),
    (["{folder}/outputs/original.mp4", "--reference", "{folder}"], "the original video"),
    ([str(DATA / "ddim_scheduler.json")], "ddim_scheduler.json: not a readable video"),
])
def test_eval_cli_bad_inputs_exit_2_naming_them(lipsynced, args, message):
    args = [a.format(folder=lipsynced) for a in args]
    result = CliRunner().invoke(app, ["eval", *args, *EVAL])
    assert result.exit_code == 2 and message.format(folder=lipsynced) in result.output, result.output


def test_scorer_ranks_face_tracks_and_scores_outputs(lipsynced):
    """The two uses beyond the command: a bulk job's call on a finished output, and active-speaker choice over the
    first seconds of a video (one face here: the mechanics, not the accuracy)."""
    out = lipsynced / "outputs" / "original.mp4"
    scorer = SyncScorer("tiny-random", detector="offline")
    scorer.setup()
    ranked = scorer.score_tracks(out, seconds=1)
    assert [(r.track.start, r.track.stop) for r in ranked] == [(0, 25)] and ranked[0].score.frame_conf.shape == (20,)
    columns = scorer(out).columns()
    assert set(columns) == {"lse_c", "lse_d", "av_offset"} and isinstance(columns["av_offset"], int)


# -- the active speaker (face="speaker") --------------------------------------------------------------------------
SPEAKER = LipSyncConfig(model="tiny-random", steps=1, detector="offline", face="speaker", score_model="tiny-random")
TWO_FACES = ("[0:v]trim=duration=2,crop=540:540:330:460,scale=256:256,split[a][b];"
             "[b]select='eq(n\\,0)',loop=loop=49:size=1,setpts=N/25/TB,scale=208:208,pad=256:256:24:24[c];"
             "[a][c]hstack,format=yuv420p[v]")


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory):
    """512x256, 2 s: demo1's face on the left as filmed, its mouth moving with its own audio; on the right the
    first frame held still and smaller. speaking.mp4 carries demo1's audio, silent.mp4 no audio track."""
    folder = tmp_path_factory.mktemp("two_faces")
    ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-i", str(DATA / "demo1_audio.wav"), "-filter_complex", TWO_FACES,
           "-map", "[v]", "-map", "1:a", "-t", "2", "-c:v", "libx264", "-c:a", "aac", str(folder / "speaking.mp4"))
    ffmpeg("-i", str(folder / "speaking.mp4"), "-an", "-c:v", "copy", str(folder / "silent.mp4"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "2", str(folder / "speech.wav"))
    return folder


def _side(box) -> str:
    return "left" if (box[0] + box[2]) / 2 < 256 else "right"


def _followed(plan, prepare) -> str:
    """The side of the face Prepare follows through the plan's first chunk."""
    part = prepare.part(plan, range(plan.chunks[0].start, plan.chunks[0].stop))
    centre = cv2.invertAffineTransform(part.matrices[0].astype(np.float64)) @ [64, 64, 1]  # the 128 px crop's centre
    assert part.flags.all()
    return "left" if centre[0] < 256 else "right"


def test_the_speaker_is_the_face_track_the_scorer_ranks_first(two_faces, monkeypatch):
    video = two_faces / "speaking.mp4"
    plan = plan_video(video, two_faces / "speech.wav", SPEAKER)
    prepare = set_up(Prepare, SPEAKER)
    ranked = sync_scorer("tiny-random", None, "offline", "cpu").score_tracks(video, seconds=SPEAKER_SECONDS)
    assert sorted(_side(np.median(r.track.boxes, 0)) for r in ranked) == ["left", "right"]
    for order in (ranked, ranked[::-1]):  # whichever the scorer ranks first is followed
        monkeypatch.setattr(SyncScorer, "score_tracks", lambda self, *args, order=order, **kwargs: order)
        found = find_speaker(plan, SPEAKER)
        np.testing.assert_array_equal(found.speaker, np.median(order[0].track.boxes, 0))
        assert _followed(found, prepare) == _side(found.speaker)
    assert find_speaker(plan, SPEAKER.with_params({"face": "largest"})) is plan


def test_without_an_audio_track_the_speaker_is_the_largest_face(two_faces, caplog):
    plan = plan_video(two_faces / "silent.mp4", two_faces / "speech.wav", SPEAKER)
    with caplog.at_level("WARNING", logger="lipsync_ray"):
        found = find_speaker(plan, SPEAKER)
    assert found.speaker is None and "silent.mp4: no audio track to find the speaker by" in caplog.text
    assert _followed(found, set_up(Prepare, SPEAKER)) == "left"  # the larger face


def test_run_face_speaker_lip_syncs_the_face_the_scorer_ranks_first(two_faces, tmp_path, monkeypatch):
    """The scorer's ranking reversed, so that the speaker is the smaller face (on the right), not the largest."""
    video, out = two_faces / "speaking.mp4", tmp_path / "out.mp4"
    ranked = sync_scorer("tiny-random", None, "offline", "cpu").score_tracks(video, seconds=SPEAKER_SECONDS)
    smaller_first = sorted(ranked, key=lambda r: r.track.mean_area)
    monkeypatch.setattr(SyncScorer, "score_tracks", lambda *args, **kwargs: smaller_first)
    args = ["--model", "tiny-random", "--steps", "1", "--detector", "offline", "--face", "speaker"]
    result = CliRunner().invoke(app, ["run", str(video), str(two_faces / "speech.wav"), "-o", str(out), *args, "--score-model", "tiny-random"])
    assert result.exit_code == 0, result.output
    with FrameReader(video) as source, FrameReader(out) as synced:
        changed = sum((np.abs(synced[i].astype(int) - source[i]).max(-1) > 40).sum(0) for i in range(0, 50, 10))
    assert changed[256:].sum() > 500 and changed[:256].sum() < 20  # the right face lip-synced, the left as filmed
    missing = CliRunner().invoke(app, ["run", str(video), str(two_faces / "speech.wav"), "-o", str(out), *args, "--checkpoints", str(tmp_path)])
    assert missing.exit_code == 2 and "lipsync-ray download --eval" in missing.output
