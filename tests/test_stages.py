"""The stage contract that the pipeline, the Ray job and Serve share."""

import pytest

from lipsync_ray.config import LipSyncConfig
from lipsync_ray.stages import Compose, Generate, Prepare, ray_resources, set_up


def test_wrappers_request_what_each_stage_declares():
    assert ray_resources(Prepare) == Prepare.resources == {"num_cpus": 1}
    assert ray_resources(Compose) == {"num_cpus": 1}
    assert ray_resources(Generate) == {"num_cpus": 1, "num_gpus": 1}
    assert ray_resources(Generate, gpu=False) == {"num_cpus": 1}  # the GPU stage on a CPU


def test_set_up_builds_a_stage_with_its_models_loaded():
    stage = set_up(Compose, LipSyncConfig(model="tiny-random"))
    assert stage.aligner.resolution == 128 and stage.stream is None
    with pytest.raises(ValueError, match="unknown model"):
        set_up(Generate, LipSyncConfig(model="no-such-model"))
