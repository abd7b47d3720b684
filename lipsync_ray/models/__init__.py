"""The networks. Imported on first use (PEP 562): a worker that only prepares or composes never imports the U-Net
and diffusers."""

from importlib import import_module

_WHERE = {
    "CheckpointMismatchError": "checkpoint",
    "load_state_dict_strict": "checkpoint",
    "read_unet_checkpoint": "checkpoint",
    "GFPGAN": "gfpgan",
    "SyncNet": "syncnet",
    "UNet3DConditionModel": "unet",
    "UNet3DOutput": "unet",
    "UNetConfig": "unet",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
