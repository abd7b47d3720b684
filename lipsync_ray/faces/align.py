"""Face alignment to the LatentSync template, crop, and paste-back, batched over frames on a torch device.

Upstream semantics (StyleSync-derived `AlignRestore`): a 3-point similarity transform (eyebrow centres and nose
centre) to a template, with the translation nudged by an exponential moving average of the nose offset in
normalised coordinates; crops are (75, 100) * ratio pixels (W, H) with ratio = resolution / 256 * 2.8, then
LANCZOS4-resized to resolution x resolution. Paste-back warps the generated face back and blends it with a mask
that is eroded and blurred in proportion to the face's size. uint8 conversions truncate, as upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import kornia
import numpy as np
import torch
import torch.nn.functional as F

TEMPLATE_256 = ((17.0, 20.0), (58.0, 20.0), (37.5, 40.0))  # per unit of `ratio`
FILL = 127.0
SMOOTH_KEEP = 0.2  # weight of the previous nose offset in the translation smoothing


@dataclass
class SmoothingState:
    """Translation-smoothing memory carried from one frame (or chunk) to the next."""

    bias: torch.Tensor | None = None


class FaceAligner:
    def __init__(self, resolution: int = 256, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.resolution = resolution
        self.device = torch.device(device)
        self.dtype = dtype
        ratio = resolution / 256 * 2.8
        self.template = torch.tensor(TEMPLATE_256, dtype=torch.float64) * ratio
        self.face_w, self.face_h = int(75 * ratio), int(100 * ratio)

    # -- transform estimation ---------------------------------------------------------------------------------
    def estimate(
        self, points: np.ndarray | torch.Tensor, state: SmoothingState | None = None, smooth: bool = True,
        memory: int | None = None,
    ) -> tuple[torch.Tensor, SmoothingState]:
        """Frame -> crop similarity matrices (F, 2, 3) float32 for landmark triples (F, 3, 2).

        Smoothing runs in frame order, as upstream does over a whole video; `state` carries it across calls.
        With `memory=K` each frame's smoothing restarts K-1 frames back instead (the dropped influence is
        0.2**K of the offset), making a frame's matrix a function of its last K frames only: a chunk that
        includes K-1 frames of warm-up then agrees exactly with a run over the whole video.
        """
        p1 = torch.as_tensor(np.asarray(points), dtype=torch.float32).reshape(-1, 3, 2)
        p2 = self.template.to(torch.float32).expand_as(p1)
        c1, c2 = p1.mean(1, keepdim=True), p2.mean(1, keepdim=True)
        s1 = (p1 - c1).flatten(1).std(1)[:, None, None]  # unbiased over all six numbers, as upstream
        s2 = (p2 - c2).flatten(1).std(1)[:, None, None]
        n1, n2 = (p1 - c1) / s1, (p2 - c2) / s2
        u, _, v = torch.svd(n1.transpose(1, 2) @ n2)
        r = v @ u.transpose(1, 2)
        flip = torch.linalg.det(r) < 0
        if flip.any():
            v = v.clone()
            v[flip, :, -1] *= -1
            r = v @ u.transpose(1, 2)
        scale = s2 / s1
        t = c2.transpose(1, 2) - scale * r @ c1.transpose(1, 2)
        m = torch.cat([scale * r, t], dim=2)
        state = state or SmoothingState()
        if smooth:
            raw = n2[:, 2] - n1[:, 2]
            bias = state.bias
            for i in range(m.shape[0]):
                if memory is not None:
                    bias = None
                    for j in range(max(0, i - memory + 1), i + 1):
                        bias = raw[j] if bias is None else SMOOTH_KEEP * bias + (1 - SMOOTH_KEEP) * raw[j]
                else:
                    bias = raw[i] if bias is None else SMOOTH_KEEP * bias + (1 - SMOOTH_KEEP) * raw[i]
                m[i, :, 2] += bias
            state = SmoothingState(bias)
        return m, state

    # -- crop -------------------------------------------------------------------------------------------------
    def _frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(frames)
        return x.to(self.device).permute(0, 3, 1, 2).to(self.dtype)

    def warp(self, frames: Sequence[np.ndarray] | np.ndarray, matrices: torch.Tensor) -> torch.Tensor:
        """Aligned face crops (F, face_h, face_w, 3) uint8 from F frames (H, W, 3) uint8 of at least 2 x 2 pixels.

        Each frame is warped from the region its crop samples (a small part of a 1080p frame), which depends on
        its own matrix only: a frame's crop is the same whichever frames it is processed with."""
        fill = torch.full((3,), FILL, device=self.device, dtype=self.dtype)
        matrices = matrices.to(torch.float32).cpu()
        out = []
        for frame, m in zip(frames, matrices):
            frame = np.asarray(frame)
            y0, y1, x0, x1 = self._source_region(m, *frame.shape[:2])
            local = m.clone()
            local[:, 2] += m[:, :2] @ torch.tensor([float(x0), float(y0)])  # the region's offset, into the translation
            crop = kornia.geometry.transform.warp_affine(
                self._frames(frame[None, y0:y1, x0:x1]),
                local[None].to(self.device, self.dtype),
                (self.face_h, self.face_w),
                mode="bilinear",
                padding_mode="fill",
                fill_value=fill,
            )
            out.append(crop.permute(0, 2, 3, 1).to(torch.uint8).cpu())
        return torch.cat(out) if out else torch.zeros((0, self.face_h, self.face_w, 3), dtype=torch.uint8)

    def _source_region(self, matrix: torch.Tensor, h: int, w: int) -> tuple[int, int, int, int]:
        """Frame rows and columns that bilinear sampling of the crop reads, clipped to the frame; at least 2 x 2
        pixels (the warp normalises by size - 1), which a crop entirely outside the frame does not read."""
        xy = self._crop_corners(kornia.geometry.transform.invert_affine_transform(matrix[None])[0])
        x0, y0 = (xy.min(0).values.floor().int() - 2).tolist()
        x1, y1 = (xy.max(0).values.ceil().int() + 3).tolist()
        x0, y0 = min(max(0, x0), w - 2), min(max(0, y0), h - 2)
        return y0, max(min(h, y1), y0 + 2), x0, max(min(w, x1), x0 + 2)

    def to_model_size(self, crops: torch.Tensor | np.ndarray) -> np.ndarray:
        """LANCZOS4 resize of (F, face_h, face_w, 3) uint8 crops to (F, res, res, 3), as upstream."""
        size = (self.resolution, self.resolution)
        out = [cv2.resize(np.asarray(c), size, interpolation=cv2.INTER_LANCZOS4) for c in np.asarray(crops)]
        return np.stack(out) if out else np.zeros((0, *size, 3), np.uint8)

    # -- paste back -------------------------------------------------------------------------------------------
    def from_model_size(self, faces: torch.Tensor) -> torch.Tensor:
        """(F, 3, res, res) faces in [-1, 1] -> (F, 3, face_h, face_w): bicubic with antialias, unclamped."""
        return F.interpolate(faces, size=(self.face_h, self.face_w), mode="bicubic", antialias=True, align_corners=False)

    def restore(
        self, frames: np.ndarray | torch.Tensor, faces: torch.Tensor, matrices: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
        """Paste faces (F, 3, face_h, face_w) in [-1, 1] back into frames (F, H, W, 3) uint8 -> uint8.

        Only the region around each face is processed: outside it the mask is zero and the frame is kept, so the
        result equals a full-frame restore at a fraction of the cost. The F regions are cut at one common size,
        each still covering its own face, and pasted in one batch: on a GPU that is a few dozen kernels and two
        waits for the whole batch instead of for every frame.

        With `weights` (face_h, face_w) in 0..1, a map over the crop, also returns what pasting them as the face
        would leave in blank frames (F, H, W) uint8 0..255: the weights as paste-back blends them in, from the
        same pass.
        """
        out = torch.as_tensor(np.asarray(frames)).clone()
        if out.shape[0] == 0:
            return out if weights is None else (out, np.zeros(out.shape[:3], np.uint8))
        h, w = out.shape[1:3]
        inv = kornia.geometry.transform.invert_affine_transform(matrices.to(torch.float32).cpu())
        corners, rh, rw = common_regions([self._face_region(m, h, w) for m in inv], h, w)
        local = inv.clone()
        local[:, 1, 2] -= torch.tensor([float(y) for y, _ in corners])
        local[:, 0, 2] -= torch.tensor([float(x) for _, x in corners])
        cut = torch.stack([frame[y : y + rh, x : x + rw] for frame, (y, x) in zip(out, corners)])
        if weights is not None:  # a fourth face channel, in the faces' range
            faces = torch.cat([faces, (weights * 2 - 1).to(faces).expand(len(faces), 1, -1, -1)], 1)
        pasted = self._restore_region(cut, faces, local)
        for frame, (y, x), region in zip(out, corners, pasted):
            frame[y : y + rh, x : x + rw] = region[..., :3]
        if weights is None:
            return out
        masks = np.zeros(out.shape[:3], np.uint8)
        for mask, (y, x), region in zip(masks, corners, pasted.numpy()):
            mask[y : y + rh, x : x + rw] = region[..., 3]
        return out, masks

    def _face_region(self, inv: torch.Tensor, h: int, w: int) -> tuple[int, int, int, int]:
        """Frame rows and columns that the pasted face (with its blur margin) can touch."""
        xy = self._crop_corners(inv)
        margin = int(0.1 * float((xy.max(0).values - xy.min(0).values).max())) + 4
        x0, y0 = (xy.min(0).values.floor().int() - margin).tolist()
        x1, y1 = (xy.max(0).values.ceil().int() + margin).tolist()
        return max(0, y0), min(h, y1), max(0, x0), min(w, x1)

    def _crop_corners(self, inv: torch.Tensor) -> torch.Tensor:
        """The crop's four corners (4, 2) in frame pixels, given the crop -> frame matrix."""
        corners = torch.tensor([[0, 0, 1], [self.face_w, 0, 1], [0, self.face_h, 1], [self.face_w, self.face_h, 1]], dtype=torch.float32)
        return corners @ inv.T

    def _restore_region(self, frames: torch.Tensor, faces: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        img = self._frames(frames)
        h, w = img.shape[-2:]
        inv = inv.to(self.device, self.dtype)
        fill = torch.full((faces.shape[1],), FILL, device=self.device, dtype=self.dtype)
        face = kornia.geometry.transform.warp_affine(
            faces.to(self.device, self.dtype), inv, (h, w), mode="bilinear", padding_mode="fill", fill_value=fill
        )
        face = (face / 2 + 0.5).clamp(0, 1) * 255
        ones = torch.ones(len(inv), 1, self.face_h, self.face_w, device=self.device, dtype=self.dtype)
        mask = erode(kornia.geometry.transform.warp_affine(ones, inv, (h, w), padding_mode="zeros"), 2)
        soft = soft_edge(mask)  # kernel sizes depend on each face's area
        out = soft * (mask * face[:, :3]) + (1 - soft) * img
        if face.shape[1] > 3:  # `restore`'s weights: blended as the face is, into blank frames
            out = torch.cat([out, soft * (mask * face[:, 3:])], 1)
        return out.permute(0, 2, 3, 1).to(torch.uint8).cpu()


def common_regions(boxes: list[tuple[int, int, int, int]], h: int, w: int) -> tuple[list[tuple[int, int]], int, int]:
    """Boxes (y0, y1, x0, x1) of h x w frames grown to their common size, down and right or moved back where the
    frame ends, so that a batch's regions stack: their top-left corners (y, x) and the size (rh, rw)."""
    rh, rw = max(y1 - y0 for y0, y1, _, _ in boxes), max(x1 - x0 for _, _, x0, x1 in boxes)
    return [(min(y0, h - rh), min(x0, w - rw)) for y0, _, x0, _ in boxes], rh, rw


def erode(x: torch.Tensor, k: int) -> torch.Tensor:
    """Flat k x k erosion (min filter) with OpenCV's anchor and border: pixels outside the image are ignored."""
    if k <= 1:
        return x
    before, after = k // 2, k - 1 - k // 2
    padded = F.pad(-x.float(), (before, after, before, after), value=float("-inf"))
    rows = F.max_pool2d(padded, (k, 1), stride=1)  # a flat square is separable: k + k comparisons, not k * k
    return (-F.max_pool2d(rows, (1, k), stride=1)).to(x.dtype)


def soft_edge(masks: torch.Tensor) -> torch.Tensor:
    """Shrink each pasted region (F, 1, H, W) by ~1/10 of its face's size and feather it: upstream's restore mask.
    Frames whose faces give the same kernel sizes are filtered together."""
    edges = (masks.double().sum((1, 2, 3)).cpu().sqrt().floor().long() // 20).tolist()
    soft = torch.empty_like(masks)
    for w_edge in sorted(set(edges)):
        same = [i for i, e in enumerate(edges) if e == w_edge]
        blur = w_edge * 2 + 1
        sigma = 0.3 * ((blur - 1) * 0.5 - 1) + 0.8
        soft[same] = kornia.filters.gaussian_blur2d(erode(masks[same], w_edge * 2), (blur, blur), (sigma, sigma))
    return soft


def three_points_from_106(landmarks: np.ndarray) -> np.ndarray:
    """insightface 106-point landmarks (..., 106, 2) -> the 3 alignment points (..., 3, 2), rounded as upstream."""
    lmk = np.asarray(landmarks, dtype=np.float64)
    brow_l = lmk[..., [43, 48, 49, 51, 50], :].mean(-2)
    brow_r = lmk[..., 101:106, :].mean(-2)
    nose = lmk[..., [74, 77, 83, 86], :].mean(-2)
    return np.round(np.stack([brow_l, brow_r, nose], axis=-2))
