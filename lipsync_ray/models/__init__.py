from .checkpoint import CheckpointMismatchError, load_state_dict_strict, read_unet_checkpoint
from .unet import UNet3DConditionModel, UNet3DOutput, UNetConfig

__all__ = [
    "CheckpointMismatchError",
    "UNet3DConditionModel",
    "UNet3DOutput",
    "UNetConfig",
    "load_state_dict_strict",
    "read_unet_checkpoint",
]
