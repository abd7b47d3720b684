from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lipsync_ray.faces import FaceAligner, OfflineDetector, make_detector, three_points_from_106
from lipsync_ray.faces.align import SmoothingState
from lipsync_ray.media import iter_frames

from .conftest import DATA, load_fixture


@pytest.fixture(scope="module")
def contract():
    return load_fixture("align_restore.pt")


def _close_uint8(a, b):
    diff = (torch.as_tensor(np.asarray(a)).int() - torch.as_tensor(np.asarray(b)).int()).abs()
    assert diff.shape == tuple(b.shape)
    return float((diff <= 1).float().mean())


@pytest.mark.parametrize("res", [256, 512])
def test_alignment_and_restore_reproduce_upstream(contract, res):
    ref = contract[f"res{res}"]
    frames = torch.stack(contract["frames"]).numpy()
    points = torch.stack(contract["landmarks3"]).numpy()
    aligner = FaceAligner(res)
    assert (aligner.face_w, aligner.face_h) == tuple(ref["face_size_wh"])
    torch.testing.assert_close(aligner.template, ref["face_template"])

    matrices, state = aligner.estimate(points)
    torch.testing.assert_close(matrices, torch.cat(ref["affine_matrices"]), rtol=1e-5, atol=5e-4)
    torch.testing.assert_close(state.bias, ref["p_bias_after_call"][1], rtol=1e-4, atol=1e-4)
    unsmoothed, _ = aligner.estimate(points[:1], smooth=False)
    torch.testing.assert_close(unsmoothed[0], ref["affine_matrix_frame0_unsmoothed"], rtol=1e-5, atol=5e-4)

    crops = aligner.warp(frames, matrices)
    for crop, expected in zip(crops, ref["cropped_faces_hwc_uint8"]):
        assert _close_uint8(crop, expected) >= 0.999
    resized = aligner.to_model_size(crops[:1])[0]
    assert resized.shape == (res, res, 3)
    assert _close_uint8(resized, ref["frame0_face_resized_lanczos4_hwc_uint8"]) >= 0.999

    face = ref["generated_face_uint8"].float() / 127.5 - 1.0
    restored = aligner.restore(frames[:1], face[None], matrices[:1])[0]
    assert _close_uint8(restored, ref["restored_frame0_hwc_uint8"]) >= 0.999
    # only the face region changes
    changed = (restored.int() - torch.as_tensor(frames[0]).int()).abs().amax(-1) > 0
    assert 0.5 * ref["restore_changed_pixels"] < changed.sum() < 1.5 * ref["restore_changed_pixels"]


def test_restoring_frames_together_equals_one_at_a_time(contract):
    """A batch is pasted in regions of one common size; each frame must come out as when pasted alone (up to
    float rounding): faces at different places, one at the frame's edge, one smaller (another blur size)."""
    frames = np.concatenate([torch.stack(contract["frames"]).numpy()] * 2)
    aligner = FaceAligner(256)
    m, _ = aligner.estimate(np.concatenate([torch.stack(contract["landmarks3"]).numpy()] * 2))
    m[1, :, 2] -= m[1, :, :2] @ torch.tensor([150.0, 0.0])
    m[2, :, 2] -= m[2, :, :2] @ torch.tensor([-100.0, 80.0])
    m[3, :, :2] *= 1.4
    faces = torch.rand(4, 3, aligner.face_h, aligner.face_w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    together = aligner.restore(frames, faces, m)
    alone = torch.cat([aligner.restore(frames[i : i + 1], faces[i : i + 1], m[i : i + 1]) for i in range(4)])
    assert (together.int() - alone.int()).abs().max() <= 1
    assert (together != alone).float().mean() < 1e-4
    changed = [int((alone[i].int() - torch.as_tensor(frames[i]).int()).abs().amax(-1).gt(0).sum()) for i in range(4)]
    assert min(changed[:3]) > 20000 and 5000 < changed[3] < 0.7 * changed[0]


def test_weights_pasted_in_the_same_pass_leave_the_frames_as_they_were(contract):
    """`restore(..., weights)`: the same frames as without, and the weights as pasting them as the face (on its
    three channels) into blank frames leaves them, bit for bit (restoration's masks come from this pass)."""
    frames = torch.stack(contract["frames"]).numpy()
    aligner = FaceAligner(256)
    m, _ = aligner.estimate(torch.stack(contract["landmarks3"]).numpy())
    faces = torch.rand(2, 3, aligner.face_h, aligner.face_w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    weights = torch.rand(aligner.face_h, aligner.face_w, generator=torch.Generator().manual_seed(1))
    pasted, masks = aligner.restore(frames, faces, m, weights)
    assert torch.equal(pasted, aligner.restore(frames, faces, m))
    as_faces = (weights * 2 - 1).expand(2, 3, -1, -1)
    assert np.array_equal(masks, aligner.restore(np.zeros_like(frames), as_faces, m)[..., 0].numpy())
    assert masks.max() > 200 and (masks > 0).mean() < 0.2


def test_warp_reads_only_the_crop_region_and_fills_outside_the_frame(contract):
    """The warp converts only the region each crop samples; a face half out of the frame still gets the fill
    colour where a whole-frame warp would, and the same pixels elsewhere."""
    import kornia

    frames = torch.stack(contract["frames"]).numpy()
    aligner = FaceAligner(256)
    matrices, _ = aligner.estimate(torch.stack(contract["landmarks3"]).numpy())
    edge, outside = matrices.clone(), matrices.clone()
    edge[:, :, 2] -= matrices[:, :, :2] @ torch.tensor([250.0, 0.0])  # the face straddles the right edge
    outside[:, :, 2] -= matrices[:, :, :2] @ torch.tensor([-500.0, 0.0])  # entirely left of the frame
    for m in (matrices, edge, outside):
        whole = kornia.geometry.transform.warp_affine(
            torch.from_numpy(frames).permute(0, 3, 1, 2).float(), m, (aligner.face_h, aligner.face_w),
            padding_mode="fill", fill_value=torch.full((3,), 127.0),
        ).permute(0, 2, 3, 1).to(torch.uint8)
        crops = aligner.warp(list(frames), m)
        assert _close_uint8(crops, whole) >= 0.999
        if m is edge:
            assert (crops[:, :, -20:] == 127).float().mean() > 0.9 and (crops[:, :, :20] == 127).float().mean() < 0.1
        if m is outside:
            assert (crops == 127).all()


def test_smoothing_state_carries_across_calls(contract):
    points = torch.stack(contract["landmarks3"]).numpy()
    aligner = FaceAligner(256)
    together, _ = aligner.estimate(points)
    first, state = aligner.estimate(points[:1])
    second, _ = aligner.estimate(points[1:], state)
    torch.testing.assert_close(torch.cat([first, second]), together)
    fresh, _ = aligner.estimate(points[1:], SmoothingState())
    assert not torch.allclose(fresh, second)


def test_three_points_from_106_landmarks():
    lmk = np.zeros((106, 2))
    lmk[[43, 48, 49, 51, 50]] = [10, 20]
    lmk[101:106] = [30, 20]
    lmk[[74, 77, 83, 86]] = [20.4, 40.6]
    np.testing.assert_array_equal(three_points_from_106(lmk), [[10, 20], [30, 20], [20, 41]])


@pytest.fixture(scope="module")
def offline():
    return OfflineDetector()


def test_offline_detector_matches_hand_placed_points(contract, offline):
    frames = list(iter_frames(DATA / "demo1_video.mp4", 0, 2))
    eyebrow_distance = 80.0
    for frame, expected in zip(frames, contract["landmarks3_full_frame"]):
        faces = offline.detect(frame)
        assert len(faces) == 1
        error = np.linalg.norm(faces[0].points - expected.numpy(), axis=1)
        assert error.max() < 0.12 * eyebrow_distance, error


@pytest.mark.slow
@pytest.mark.parametrize("video", ["demo1_video.mp4", "demo2_video.mp4"])
def test_offline_detector_finds_the_face_on_every_frame(offline, video):
    counts = [len(offline.detect(frame)) for frame in iter_frames(DATA / video)]
    assert len(counts) in (250, 502)
    assert min(counts) >= 1, [i for i, c in enumerate(counts) if c == 0]


def test_frame_without_face_is_reported_not_raised(offline):
    frame = next(iter_frames(DATA / "demo1_video.mp4"))
    assert offline.detect(frame[:300]) == []  # the wall above her head
    assert offline.detect(np.full((480, 640, 3), 127, np.uint8)) == []


def test_offline_detector_is_safe_from_several_threads(offline):
    """Serve calls Prepare from its thread pool: one shared LiteRT interpreter raised or mixed up results."""
    frames = list(iter_frames(DATA / "demo1_video.mp4", 0, 12))
    alone = [[f.points for f in offline.detect(frame)] for frame in frames]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: [f.points for f in offline.detect(frames[i % 12])], range(96)))
    for i, points in enumerate(together):
        np.testing.assert_array_equal(points, alone[i % 12])


def test_auto_detector_is_offline_without_insightface_files(tmp_path, offline):
    assert make_detector("auto", root=tmp_path).name == "offline"
    with pytest.raises(FileNotFoundError, match="buffalo_l"):
        make_detector("insightface", root=tmp_path)


def test_upstream_filters_on_insightface_detections():
    from types import SimpleNamespace

    from lipsync_ray.faces.detect import upstream_filter

    lmk = np.tile([[100.0, 100.0]], (106, 1))

    def det(box, score=0.9):
        return SimpleNamespace(bbox=np.array(box, float), det_score=score, landmark_2d_106=lmk)

    faces = upstream_filter(
        [
            det([0, 0, 60, 90]),  # kept
            det([0, 0, 40, 90]),  # too narrow
            det([0, 0, 60, 70]),  # too short
            det([0, 0, 200, 100]),  # too wide for its height
            det([0, 0, 120, 160], score=0.4),  # low score
            det([0, 0, 100, 150]),  # kept, largest
        ]
    )
    assert [f.area for f in faces] == [15000, 5400]
    np.testing.assert_array_equal(faces[0].points, [[100, 100]] * 3)
