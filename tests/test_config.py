"""LipSyncConfig: one place for every default, and what the CLI takes from it."""

import os

import pytest
import typer
from pydantic import ValidationError

from lipsync_ray.cli import app
from lipsync_ray.config import BatchConfig, LipSyncConfig


def test_with_params_validates_and_leaves_the_base_alone():
    base = LipSyncConfig(model="tiny-random", steps=4)
    video = base.with_params({"steps": 2, "seed": 7})
    assert (video.steps, video.seed, video.model) == (2, 7, "tiny-random") and base.steps == 4
    assert base.with_params({}) is base
    with pytest.raises(ValidationError, match="steps"):
        base.with_params({"steps": 0})
    with pytest.raises(ValidationError, match="no_such_option"):
        base.with_params({"no_such_option": 1})


POOLS = ["prepare_actors", "generate_actors", "chunks_per_batch", "chunks_per_prepare", "generate_prefetch"]


@pytest.mark.parametrize("command, model", [("run", LipSyncConfig), ("batch", LipSyncConfig), ("batch", BatchConfig)])
def test_command_options_take_their_default_and_help_from_the_config(command, model):
    options = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    shared = [name for name in LipSyncConfig.model_fields if name in options] if model is LipSyncConfig else POOLS
    assert len(shared) >= 12 or model is BatchConfig
    for name in shared:
        field, option = model.model_fields[name], options[name]
        default = ",".join("" if v is None else str(v) for v in field.default) if isinstance(field.default, tuple) else field.default
        assert option.default == default, name
        assert option.help == f"{field.description}.", name


def test_prepare_runs_in_workers_by_default_only_on_gpu_hosts_with_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert LipSyncConfig(device="cuda").resolved_prepare_workers() == 4
    assert LipSyncConfig(device="cpu").resolved_prepare_workers() == 0
    assert LipSyncConfig(device="cuda", prepare_workers=0).resolved_prepare_workers() == 0
    assert LipSyncConfig(device="cpu", prepare_workers=3).resolved_prepare_workers() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert LipSyncConfig(device="cuda").resolved_prepare_workers() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert LipSyncConfig(device="cuda").resolved_prepare_workers() == 0


