"""Cluster configs: Ray's own launcher validation, KubeRay CRD schemas, Serve's schema, and autoscaling GPU
workers on one machine with Ray's fake multi-node provider."""

import copy
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import DATA, ffmpeg, free_port
from .kuberay import validate

ROOT = Path(__file__).parents[1]
KUBERAY = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "cluster" / "kuberay").glob("*.yaml")}


def test_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    assert all(t["min_workers"] == 0 for n, t in types.items() if n != config["head_node_type"])
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(broken)


@pytest.mark.parametrize("name", ["raycluster", "rayjob", "rayservice"])
def test_kuberay_manifests_validate_against_the_crds(name):
    assert validate(KUBERAY[name]) == []


def test_the_validator_catches_typos_and_wrong_types():
    bad = copy.deepcopy(KUBERAY["raycluster"])
    group = bad["spec"]["workerGroupSpecs"][1]
    group["minReplica"] = group.pop("minReplicas")
    group["maxReplicas"] = "four"
    errors = validate(bad)
    assert any("minReplica" in e for e in errors) and any("'four' is not of type 'integer'" in e for e in errors), errors


def test_worker_groups_autoscale_from_zero():
    for name, path in [("raycluster", ["spec"]), ("rayjob", ["spec", "rayClusterSpec"]), ("rayservice", ["spec", "rayClusterConfig"])]:
        spec = KUBERAY[name]
        for key in path:
            spec = spec[key]
        assert spec["enableInTreeAutoscaling"] is True and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert all(g["minReplicas"] == 0 for g in groups.values())
        assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_rayservice_embeds_the_serve_config_and_serve_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    from lipsync_ray.config import ServeConfig

    embedded = KUBERAY["rayservice"]["spec"]["serveConfigV2"]
    assert embedded == (ROOT / "serve" / "config.yaml").read_text()
    schema = ServeDeploySchema.model_validate(yaml.safe_load(embedded))
    app = schema.applications[0]
    assert app.import_path == "lipsync_ray.serve:build_app"
    ServeConfig.model_validate(app.args)  # our own args model rejects unknown keys


def test_rayjob_runs_the_documented_job_command():
    entrypoint = KUBERAY["rayjob"]["spec"]["entrypoint"]
    assert entrypoint.startswith("python jobs/batch.py --catalog ")
    readme = (ROOT / "README.md").read_text()
    assert "python jobs/batch.py --catalog" in readme and "cluster/kuberay/rayjob.yaml" in readme
    from typer.testing import CliRunner

    from lipsync_ray.cli import app

    assert CliRunner().invoke(app, ["batch", "--help"]).exit_code == 0
    for option in [w for w in entrypoint.split() if w.startswith("--")]:
        assert option in CliRunner().invoke(app, ["batch", "--help"], terminal_width=200).output, option


# ---- autoscaling on one machine -------------------------------------------------------------------------

FAKE_CLUSTER = {
    "cluster_name": "fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",  # the name the fake provider requires
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
}


def _kill_cluster(marker: str) -> None:
    """Stop only this cluster's processes (those naming its temp dir, and their children)."""
    pids = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            subprocess.run(["pkill", f"-{sig.name[3:]}", "-P", pid], capture_output=True)
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(2)


@pytest.fixture
def fake_cluster():
    from ray.autoscaler._private.util import validate_config

    temp = tempfile.mkdtemp(prefix="rayfake-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dashboard = free_port(), free_port()
    config = copy.deepcopy(FAKE_CLUSTER)
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    validate_config(config)
    path = Path(temp) / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
         f"--autoscaling-config={path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, cwd=ROOT, check=True, capture_output=True, timeout=180,
    )
    try:
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_cluster(temp)


def _gpu_nodes(gcs: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=gcs, detail=True, raise_on_missing_output=False) if n.state == "ALIVE" and n.resources_total.get("GPU", 0) > 0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_workers_scale_up_for_the_job_and_down_after(fake_cluster, tmp_path, monkeypatch):
    """The job's default GPU pool (min 1, no max) grows while chunks queue for the GPU stage: Ray Data asks the
    cluster for another GPU and adds a Generate actor, Ray's autoscaler a GPU node for it; once the job is done the
    idle GPU nodes go. About 2 minutes on 2 cores."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from lipsync_ray.catalog import read_manifest

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    gcs, dashboard = fake_cluster
    # 8 clips of 2 s, 4 chunks each (a 16-frame window a chunk), 10 steps: the one GPU actor has chunks queued for
    # longer than Ray Data takes to ask for a second GPU, see it reserved and start an actor there (30-55 s after the
    # job's dataset starts here: Ray Data asks every 10 s, and its coordinator sees new nodes every 20 s)
    clips = 8
    ffmpeg("-i", str(DATA / "demo1_video.mp4"), "-t", "2", "-vf", "scale=270:480", "-c:v", "libx264", "-an", str(tmp_path / "v.mp4"))
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "2", str(tmp_path / "a.wav"))
    rows = [{"id": f"clip{i}", "video": str(tmp_path / "v.mp4"), "audio": str(tmp_path / "a.wav")} for i in range(clips)]
    (tmp_path / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _gpu_nodes(gcs) == []
    client = None
    for _ in range(60):
        try:
            client = JobSubmissionClient(dashboard)
            break
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            time.sleep(1)
    entrypoint = (  # the default GPU pool (--generate-actors 1,); one Prepare actor leaves a head CPU to plan and compose
        f"python jobs/batch.py --catalog {tmp_path / 'catalog.jsonl'} --output {tmp_path / 'out'} --model tiny-random "
        "--steps 10 --windows-per-chunk 1 --detector offline --gpu --prepare-actors 1,1"
    )
    for _ in range(60):  # the job agent registers a little after the dashboard answers
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": f"local://{ROOT}"})
            break
        except RuntimeError as err:
            assert "No available agent" in str(err)
            time.sleep(1)
    seen = [(0.0, set())]  # the GPU nodes while the job runs: (seconds since submission, node ids) as they change
    start = time.time()
    while time.time() < start + 600 and not client.get_job_status(job).is_terminal():
        nodes = {n.node_id[-8:] for n in _gpu_nodes(gcs)}
        if nodes != seen[-1][1]:
            seen.append((round(time.time() - start, 1), nodes))
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert f"{clips} videos: {clips} ok" in logs
    from lipsync_ray.media import probe_video

    assert all(probe_video(tmp_path / "out" / f"clip{i}.mp4").frames == 50 for i in range(clips))
    assert any(len(nodes) == 2 for _, nodes in seen), f"never two GPU workers at once: {seen}"
    manifest = read_manifest(str(tmp_path / "out" / "manifest.parquet"))
    assert list(manifest.status) == ["ok"] * clips
    workers = set().union(*manifest.workers)
    assert len(workers) >= 2, f"one Generate actor ran every chunk: {workers}; GPU nodes {seen}"
    for _ in range(120):  # idle_timeout_minutes 0.1
        if not _gpu_nodes(gcs):
            break
        time.sleep(1)
    assert _gpu_nodes(gcs) == [], "idle GPU workers were not removed"
