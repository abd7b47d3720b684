from .whisper_features import (
    EncodedWindows,
    chunk_features,
    feature_rows,
    mel_ceiling,
    SAMPLE_RATE,
    AudioMode,
    WhisperFeatureEncoder,
    feature_array,
    frame_features,
    frame_indices,
    log_mel,
    upstream_num_frames,
)

__all__ = [
    "EncodedWindows",
    "chunk_features",
    "feature_rows",
    "mel_ceiling",
    "SAMPLE_RATE",
    "AudioMode",
    "WhisperFeatureEncoder",
    "feature_array",
    "frame_features",
    "frame_indices",
    "log_mel",
    "upstream_num_frames",
]
