from .whisper_features import (
    SAMPLE_RATE,
    AudioMode,
    WhisperFeatureEncoder,
    audio_frames,
    feature_array,
    frame_features,
    frame_indices,
    log_mel,
    upstream_num_frames,
)

__all__ = [
    "SAMPLE_RATE",
    "AudioMode",
    "WhisperFeatureEncoder",
    "audio_frames",
    "feature_array",
    "frame_features",
    "frame_indices",
    "log_mel",
    "upstream_num_frames",
]
