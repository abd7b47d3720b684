from .video import iter_frames

__all__ = ["iter_frames"]
