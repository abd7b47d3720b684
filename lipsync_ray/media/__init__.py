from .encode import VideoWriter
from .probe import AudioTooLong, Colour, MediaError, VideoInfo, load_audio, probe_audio, probe_video
from .video import FrameReader, iter_frames

__all__ = [
    "AudioTooLong", "Colour", "FrameReader", "MediaError", "VideoInfo", "VideoWriter", "iter_frames", "load_audio", "probe_audio",
    "probe_video",
]
