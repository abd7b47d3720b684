from .encode import VideoWriter
from .probe import Colour, MediaError, VideoInfo, load_audio, probe_video
from .video import FrameReader, iter_frames

__all__ = ["Colour", "FrameReader", "MediaError", "VideoInfo", "VideoWriter", "iter_frames", "load_audio", "probe_video"]
