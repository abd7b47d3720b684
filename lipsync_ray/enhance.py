"""Face restoration of lip-synced frames (GFPGAN v1.4), composited only where lip-sync changed the picture.

Each face is warped to the FFHQ template GFPGAN was trained on (a least-squares similarity from 5 points: eye
centres, nose tip, mouth corners, to facexlib's template), restored in batches with the checkpoint's fixed noise,
warped back, and blended into the frame through the restoration mask: paste-back's soft face mask times the
regenerated lower face of the crop (mask.png), feathered inward. Where that mask is 0 the frame is returned
unchanged, to the bit: eyes, hair and background keep their pixels.

The pipeline's detectors give three alignment points (eyebrow centres, nose centre), not five. `five_points`
places a mean face's five points in the aligned crop and maps them to the frame by the (smoothed) alignment
matrices, so restoration sees the face where paste-back puts it. The mean face was measured with the offline
detector's face mesh (eye-contour means, nose tip 1, mouth corners 61 and 291) on every frame of
tests/data/demo1_video.mp4 and demo2_video.mp4, each frame's points mapped into its unsmoothed crop, the two
videos' means averaged and made left-right symmetric; per-frame spread about 2 crop units (a few pixels at
512 px), well within what GFPGAN tolerates. Mouth corners of a mean face rather than measured ones also keep
the alignment independent of the (regenerated) mouth.

Temporal stability: `masked_flicker` is the mean absolute frame-to-frame difference inside the masks, the
measure to compare with and without restoration on a static-face clip.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import load_mask
from .faces.align import TEMPLATE_256, FaceAligner, common_regions, erode
from .models.gfpgan import get_restorer, load_restorer

# facexlib's FFHQ 512 template: image-left eye, image-right eye, nose tip, image-left and image-right mouth corner
FFHQ_512 = ((192.98138, 239.94708), (318.90277, 240.1936), (256.63416, 314.01935), (201.26117, 371.41043),
            (313.08905, 371.15118))
FFHQ_FILL = (132.0, 133.0, 135.0)  # RGB of facexlib's border value outside the frame
# the same five points of a mean face in FaceAligner's crop, per unit of its `ratio` (like TEMPLATE_256)
FIVE_POINTS_256 = ((17.15, 26.9), (57.85, 26.9), (37.5, 45.6), (19.6, 66.3), (55.4, 66.3))


def five_points(aligner: FaceAligner, matrices: torch.Tensor) -> np.ndarray:
    """The five FFHQ landmarks (F, 5, 2) in frame pixels of faces aligned by `matrices` (F, 2, 3), frame -> crop."""
    ratio = float(aligner.template[0, 0]) / TEMPLATE_256[0][0]
    crop = torch.tensor(FIVE_POINTS_256, dtype=torch.float64) * ratio
    inv = kornia.geometry.transform.invert_affine_transform(torch.as_tensor(matrices, dtype=torch.float64))
    return (crop @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2]).numpy()


@lru_cache(maxsize=4)
def regenerated_region(resolution: int) -> torch.Tensor:
    """The crop's lower face that lip-sync regenerates (mask.png == 0) as weights (res, res), feathered inward:
    eroded, then blurred no further than the erosion, so that it stays inside the regenerated pixels. Computed once
    per resolution: callers must not change it."""
    feather = max(1, resolution // 32)
    region = erode((1 - load_mask(resolution))[None, None], 2 * feather)
    sigma = feather / 2
    return kornia.filters.gaussian_blur2d(region, (2 * feather + 1, 2 * feather + 1), (sigma, sigma))[0, 0]


def restoration_weights(aligner: FaceAligner) -> torch.Tensor:
    """The regenerated region at the aligner's crop size (face_h, face_w): the `weights` of `FaceAligner.restore`
    that make its masks the restoration masks."""
    region = regenerated_region(aligner.resolution)
    return F.interpolate(region[None, None], size=(aligner.face_h, aligner.face_w), mode="bilinear", align_corners=False)[0, 0]


def restoration_masks(aligner: FaceAligner, matrices: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Per frame, where and how much restoration may change the pasted frame (F, height, width) uint8 0..255:
    paste-back's own soft mask times the regenerated region. Compose gets them from its paste-back pass itself."""
    blank = np.zeros((len(matrices), height, width, 3), np.uint8)
    faces = torch.zeros(len(matrices), 3, aligner.face_h, aligner.face_w)
    return aligner.restore(blank, faces, torch.as_tensor(matrices), restoration_weights(aligner))[1]


def similarity(points: np.ndarray, template: np.ndarray) -> torch.Tensor:
    """Least-squares similarity transforms (F, 2, 3) float64 that map landmarks (F, N, 2) onto `template` (N, 2)."""
    src = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    dst = torch.as_tensor(np.asarray(template), dtype=torch.float64).expand_as(src)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    (sx, sy), (dx, dy) = (src - src_mean).unbind(-1), (dst - dst_mean).unbind(-1)
    norm = (sx.square() + sy.square()).sum(1)
    a = (sx * dx + sy * dy).sum(1) / norm  # scale * cos
    b = (sx * dy - sy * dx).sum(1) / norm  # scale * sin
    rotation = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    shift = dst_mean[:, 0] - (rotation @ src_mean.transpose(1, 2))[..., 0]
    return torch.cat([rotation, shift[..., None]], -1)


def _box(xy: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    """Rows and columns (y0, y1, x0, x1) of the frame around points (N, 2), one pixel beyond for bilinear
    sampling, at least 2 x 2 (kornia's warp normalises by size - 1)."""
    x0, y0 = np.clip(np.floor(xy.min(0)).astype(int) - 1, 0, [w - 2, h - 2])
    x1, y1 = np.ceil(xy.max(0)).astype(int) + 2
    return int(y0), int(max(min(h, y1), y0 + 2)), int(x0), int(max(min(w, x1), x0 + 2))


def masked_flicker(frames: np.ndarray, masks: np.ndarray) -> float:
    """Mean absolute frame-to-frame difference (0..255) of frames (F, H, W, 3) inside masks (F, H, W) 0..255,
    weighted by the smaller mask of each pair of consecutive frames."""
    diff = np.abs(np.diff(np.asarray(frames, np.float32), axis=0)).mean(-1)
    weight = np.minimum(masks[1:], masks[:-1]).astype(np.float32) / 255
    return float((diff * weight).sum() / max(weight.sum(), 1e-6))


class FaceRestorer:
    """GFPGAN restoration of pasted frames. `preset`: a name of `models.gfpgan.RESTORERS` ("gfpgan" needs
    GFPGANv1.4.pth under the checkpoints root, see `models.gfpgan.restorer_weights` for the check to make before
    video work starts; "tiny-random" needs no file). Build, `setup()` once where it runs (loads the weights),
    then call on batches of frames."""

    def __init__(self, preset: str = "gfpgan", checkpoints: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16):
        self.size = get_restorer(preset).config["out_size"]
        self.preset, self.checkpoints = preset, checkpoints
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.template = np.array(FFHQ_512) * self.size / 512

    def setup(self) -> None:
        self.model = load_restorer(self.preset, self.checkpoints).to(self.device, self.dtype)

    def __call__(self, frames: np.ndarray, landmarks: np.ndarray, masks: np.ndarray, strength: float = 0.5) -> np.ndarray:
        """Restored frames (F, H, W, 3) uint8 from pasted frames (F, H, W, 3) uint8 RGB, their five FFHQ landmarks
        (F, 5, 2) and restoration masks (F, H, W) uint8 0..255 (`restoration_masks`); `strength` 0..1 is the
        share of the restored face in the blend. Frames whose mask is empty, and strength 0, cost nothing."""
        frames = np.asarray(frames)
        out = frames.copy()
        if not 0 <= strength <= 1:
            raise ValueError(f"restoration strength must be within 0..1, got {strength}")
        todo = [i for i in range(len(frames)) if strength > 0 and masks[i].any()]
        if not todo:
            return out
        matrices = similarity(np.asarray(landmarks)[todo], self.template).to(torch.float32)
        for start in range(0, len(todo), self.batch_size):
            indices = todo[start : start + self.batch_size]
            batch = [out[i] for i in indices]  # views: blended in place
            batch_matrices = matrices[start : start + len(indices)]
            faces = self._faces(batch, batch_matrices)
            with torch.inference_mode():
                restored = self.model(faces.to(self.dtype), return_rgb=False)[0].float().clamp(-1, 1)
            self._blend(batch, restored, batch_matrices, [masks[i] for i in indices], strength)
        return out

    def _faces(self, frames: list[np.ndarray], matrices: torch.Tensor) -> torch.Tensor:
        """Faces aligned to the template (F, 3, size, size) in [-1, 1]: one warp of one region per frame, cut at a
        common size around what each face samples (a small part of the frame), moved to the device together."""
        h, w = frames[0].shape[:2]
        corners = np.array([[0, 0], [self.size, 0], [0, self.size], [self.size, self.size]], np.float32)
        inv = kornia.geometry.transform.invert_affine_transform(matrices).numpy()
        boxes = [_box(corners @ m[:, :2].T + m[:, 2], h, w) for m in inv]
        origins, region = _regions(frames, boxes)
        local = matrices.clone()
        local[:, :, 2] += (matrices[:, :, :2] @ torch.tensor(origins, dtype=torch.float32)[..., None])[..., 0]
        face = kornia.geometry.transform.warp_affine(
            region.to(self.device).permute(0, 3, 1, 2).float(), local.to(self.device), (self.size, self.size),
            mode="bilinear", padding_mode="fill", fill_value=torch.tensor(FFHQ_FILL, device=self.device),
        )
        return face / 127.5 - 1

    def _blend(self, frames: list[np.ndarray], faces: torch.Tensor, matrices: torch.Tensor, masks: list[np.ndarray],
               strength: float) -> None:
        """Warp the restored faces (F, 3, size, size) back and blend them into `frames` (H, W, 3) in place, only
        where their masks are non-zero. Blended on the faces' device, in one region per frame: only uint8 regions
        move."""
        h, w = frames[0].shape[:2]
        boxes = []
        for mask in masks:
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))  # the extent, without every pixel
            boxes.append(_box(np.array([[cols[0], rows[0]], [cols[-1], rows[-1]]]), h, w))
        origins, base = _regions(frames, boxes)
        _, weight = _regions([mask[..., None] for mask in masks], boxes)
        rh, rw = base.shape[1:3]
        inv = kornia.geometry.transform.invert_affine_transform(matrices)
        inv[:, :, 2] -= torch.tensor(origins, dtype=torch.float32)
        with_coverage = torch.cat([(faces + 1) * 127.5, torch.ones_like(faces[:, :1])], 1)  # 4th: inside the face
        back = kornia.geometry.transform.warp_affine(with_coverage, inv.to(faces.device), (rh, rw), mode="bilinear")
        back = back.permute(0, 2, 3, 1)
        base = base.to(faces.device).float()
        weight = weight.to(faces.device).float() / 255 * back[..., 3:] * strength
        blended = (base + weight * (back[..., :3] - base)).round().clamp(0, 255)
        blended = torch.where(weight > 0, blended, base).to(torch.uint8).cpu().numpy()
        for frame, (x, y), region in zip(frames, origins, blended):
            frame[y : y + rh, x : x + rw] = region


def _regions(images: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Each image's box (y0, y1, x0, x1) cut at the boxes' common size (`common_regions`): the cuts' top-left
    corners (x, y) and the cuts (N, rh, rw, C) in one tensor."""
    corners, rh, rw = common_regions(boxes, *images[0].shape[:2])
    cuts = np.stack([image[y : y + rh, x : x + rw] for image, (y, x) in zip(images, corners)])
    return [(x, y) for y, x in corners], torch.from_numpy(cuts)
