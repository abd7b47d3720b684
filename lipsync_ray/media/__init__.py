from .encode import VideoWriter
from .probe import MediaError, VideoInfo, load_audio, probe_video
from .video import iter_frames

__all__ = ["MediaError", "VideoInfo", "VideoWriter", "iter_frames", "load_audio", "probe_video"]
