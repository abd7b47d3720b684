from .checkpoint import CheckpointMismatchError, load_state_dict_strict, read_unet_checkpoint
from .gfpgan import GFPGAN
from .syncnet import SyncNet
from .unet import UNet3DConditionModel, UNet3DOutput, UNetConfig

__all__ = [
    "CheckpointMismatchError",
    "GFPGAN",
    "SyncNet",
    "UNet3DConditionModel",
    "UNet3DOutput",
    "UNetConfig",
    "load_state_dict_strict",
    "read_unet_checkpoint",
]
