"""The notebooks run top to bottom (nbclient, a fresh kernel each) on tiny-random on this machine. cluster.ipynb's
cells that need a cluster skip themselves without RAY_ADDRESS, and run against a Ray head started here with its
dashboard (job submission) and a local S3 (moto). In git the notebooks carry no outputs."""

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lipsync_ray.catalog import read_manifest
from lipsync_ray.media import probe_video

from .conftest import free_port
from .test_cluster import _kill_cluster

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
TINY_JOB = "--steps 1 --detector offline --prepare-actors 1,1 --generate-actors 1,1"


def _execute(name: str) -> list[dict]:
    """Run the notebook in its folder; returns its code cells with their outputs."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return [cell for cell in book.cells if cell.cell_type == "code"]


def _text(cell: dict) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "cluster.ipynb"])
def test_notebooks_are_stripped_in_git(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    assert all(not c.outputs and c.execution_count is None for c in book.cells if c.cell_type == "code")


@pytest.mark.slow
def test_quickstart_runs_a_clip_a_bulk_job_and_a_serve_query(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("LIPSYNC_MODEL", "tiny-random")
    monkeypatch.setenv("LIPSYNC_WORK", str(tmp_path))
    cells = _execute("quickstart.ipynb")
    assert sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs) == 2  # the frames and the chart
    assert probe_video(tmp_path / "demo.mp4").frames == 75
    manifest = read_manifest(str(tmp_path / "lipsynced" / "manifest.parquet")).set_index("id")
    assert manifest.status.to_dict() == {"demo": "ok", "short": "ok", "short-silence": "ok"}
    assert manifest.frames.to_dict() == {"demo": 75, "short": 50, "short-silence": 75}  # 2 s of speech; silence: 3 s
    assert probe_video(tmp_path / "served.mp4").frames == 50
    assert re.search(r"50 frames in [\d.]+ s", _text(cells[-2]))


def test_cluster_notebook_without_a_cluster_skips_the_cells_that_need_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cells = _execute("cluster.ipynb")
    marked = [c for c in cells if c.source.startswith("# needs a cluster")]
    assert len(marked) == 3 and all(_text(c).strip() == "skipped: no RAY_ADDRESS" for c in marked)
    assert any("ray job submit --address http://HEAD:8265" in _text(c) and "python jobs/batch.py" in _text(c) for c in cells)


@pytest.fixture
def ray_head(s3_endpoint):
    """A one-node Ray cluster with its dashboard, as `ray start --head` makes one (the S3 variables reach its jobs);
    yields the dashboard's URL once it takes jobs. Only this cluster's processes are stopped afterwards."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="raynb-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    dashboard = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=4", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    try:
        for _ in range(120):  # the job agent registers a little after the dashboard answers
            try:
                client = JobSubmissionClient(dashboard)
                probe = client.submit_job(entrypoint="python -c pass")
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(1)
        while not client.get_job_status(probe).is_terminal():
            time.sleep(0.5)
        yield dashboard
    finally:
        _kill_cluster(temp)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cluster_notebook_submits_the_job_and_reads_the_manifest_from_s3(ray_head, monkeypatch):
    import fsspec

    fsspec.filesystem("s3").mkdir("notebook")
    for name, value in (("RAY_ADDRESS", ray_head), ("LIPSYNC_CATALOG", "s3://notebook/lipsync/catalog.parquet"),
                        ("LIPSYNC_OUTPUT", "s3://notebook/lipsync/out"), ("LIPSYNC_MODEL", "tiny-random"), ("LIPSYNC_JOB_OPTIONS", TINY_JOB)):
        monkeypatch.setenv(name, value)
    cells = _execute("cluster.ipynb")
    assert "exit code 0" in _text(cells[4]), _text(cells[4])[-3000:]
    manifest = read_manifest("s3://notebook/lipsync/out/manifest.parquet").set_index("id")
    assert manifest.status.to_dict() == {"demo": "ok", "demo-loop": "ok"} and set(manifest.frames) == {75}
    assert "demo-loop" in _text(cells[-1]) and any("image/png" in o.get("data", {}) for o in cells[-1].outputs)
