from .align import FaceAligner, SmoothingState, three_points_from_106
from .detect import Face, FaceDetector, InsightFaceDetector, OfflineDetector, make_detector

__all__ = [
    "Face",
    "FaceAligner",
    "FaceDetector",
    "InsightFaceDetector",
    "OfflineDetector",
    "SmoothingState",
    "make_detector",
    "three_points_from_106",
]
