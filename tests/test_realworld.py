"""Everyday video files through `run`, the bulk job and Serve: other containers and codecs, variable frame rate,
timestamp gaps, edit lists, a late start, rotation, 10 bit, odd sizes, full range, damaged streams.

Every clip is made here with ffmpeg from one marked master (each frame carries its number in a band above the
picture, see conftest.MARK). The truth comes from the ffmpeg command line, not from the package: ffprobe's packet
timestamps say when each frame is on screen, and ffmpeg's own decode (which applies rotation and edit lists)
says what it shows. Output frame j must show the frame on screen at j/25 s."""

import json
import subprocess

import httpx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lipsync_ray.batch import run_batch
from lipsync_ray.cli import app
from lipsync_ray.config import BatchConfig, LipSyncConfig
from lipsync_ray.media import FrameReader, MediaError, probe_video

from .conftest import DATA, MARK, ffmpeg, marks_shown, serve_apps

ARGS = ["--model", "tiny-random", "--steps", "1", "--detector", "offline"]
OUT_FRAMES = 40  # the 1.6 s of target speech
H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-an"]

# name -> (file name, filters after the scale and before the mark, after the mark, encoder arguments)
CASES = {
    "mkv": ("h264.mkv", "", "", H264),
    "webm_vp9_30fps": ("vp9.webm", "fps=30,", "", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "400k"]),
    "vfr": ("vfr.mp4", "", ",setpts='(N*0.04+0.02*mod(N\\,2)+0.03*gte(N\\,30))/TB'",
            ["-fps_mode", "passthrough", "-video_track_timescale", "1000", *H264]),
    "timestamp_gap": ("gap.mkv", "", ",setpts='PTS+gte(N\\,20)*0.4/TB'", ["-fps_mode", "passthrough", *H264]),
    "late_start": ("late.ts", "", "", ["-output_ts_offset", "3.3", *H264]),
    "hevc_10bit": ("hevc10.mp4", "", "", ["-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le", "-tag:v", "hvc1", "-x265-params", "log-level=none"]),
    "odd_size": ("odd.mp4", "", ",scale=271:497", ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p"]),
    "full_range": ("full.mp4", "", ",scale=out_range=pc,format=yuvj420p", ["-color_range", "pc", *H264]),
    "av1": ("av1.mkv", "", "", ["-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "40", "-row-mt", "1"]),
    "prores": ("prores.mov", "", "", ["-c:v", "prores_ks", "-profile:v", "0"]),
    "avi_mpeg4": ("mpeg4.avi", "", "", ["-c:v", "mpeg4", "-q:v", "3"]),
}
RUN_CASES = ["mkv", "webm_vp9_30fps", "vfr", "timestamp_gap", "late_start", "hevc_10bit", "odd_size", "full_range",
             "edit_list", "rotated_90", "rotated_270", "concatenated"]


def cli_truth(path) -> tuple[np.ndarray, list[int]]:
    """(presentation times from ffprobe's packets, edit-list drops left out; the marks ffmpeg's decode shows)."""
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time,dts_time,flags", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    times = sorted(
        float(p["pts_time"] if p.get("pts_time", "N/A") != "N/A" else p["dts_time"])
        for p in json.loads(probe.stdout)["packets"] if "D" not in p["flags"]
    )
    info = json.loads(subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height:stream_side_data=rotation", "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout)["streams"][0]
    w, h = info["width"], info["height"]
    if any(abs(s.get("rotation", 0)) == 90 for s in info.get("side_data_list", [])):
        w, h = h, w
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)
    assert len(frames) == len(times), (path, len(frames), len(times))
    return np.array(times) - times[0], [_mark(f) for f in frames]


def _mark(frame: np.ndarray) -> int:
    band = frame[2:14].mean((0, 2))
    return round((np.flatnonzero(band > 128).mean() - 1.5) / 4)


def expected_marks(truth, n_out: int = OUT_FRAMES) -> list[int]:
    times, marks = truth
    return [marks[np.searchsorted(times, j / 25 + 1e-6, side="right") - 1] for j in range(n_out)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("realworld")
    demo = str(DATA / "demo1_video.mp4")
    for name, (file, pre, post, encoder) in CASES.items():
        ffmpeg("-i", demo, "-t", "2", "-vf", f"{pre}scale=270:480,{MARK}{post}", *encoder, "-an", str(d / file))
    files = {name: d / file for name, (file, *_) in CASES.items()}
    ffmpeg("-i", demo, "-t", "2.4", "-vf", f"scale=270:480,{MARK}", "-g", "12", *H264, str(d / "master.mp4"))
    ffmpeg("-ss", "0.5", "-i", str(d / "master.mp4"), "-c", "copy", str(d / "edit.mp4"))  # an edit list drops the lead-in
    ffmpeg("-stream_loop", "1", "-i", str(d / "master.mp4"), "-t", "3", "-c", "copy", str(d / "looped.mp4"))
    # portrait clips stored sideways, as phones write them: the display matrix turns them upright
    for name, transpose, rotate in [("rotated_90", "2", "-90"), ("rotated_270", "1", "90")]:
        ffmpeg("-i", str(d / "master.mp4"), "-vf", f"transpose={transpose}", *H264, str(d / "sideways.mp4"))
        ffmpeg("-i", str(d / "sideways.mp4"), "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}", str(d / f"{name}.mp4"))
        files[name] = d / f"{name}.mp4"
    files.update(edit_list=d / "edit.mp4", concatenated=d / "looped.mp4")
    ffmpeg("-i", str(DATA / "demo1_audio.wav"), "-t", "1.6", str(d / "speech.wav"))
    ffmpeg("-i", demo, "-t", "1.6", "-vf", "scale=270:480", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(d / "speech_in_a_video.mp4"))
    return d, files


@pytest.mark.parametrize("name", [*CASES, "edit_list", "rotated_90", "rotated_270", "concatenated"])
def test_every_frame_decodes_upright_at_its_presentation_time(corpus, name):
    _, files = corpus
    truth = cli_truth(files[name])
    info = probe_video(files[name])
    assert info.frames == len(truth[1]) and info.rotation in (0, 90, 270)
    assert (info.width, info.height) == ((271, 497) if name == "odd_size" else (270, 496))
    if name == "edit_list":
        assert truth[1][0] >= 12  # ffmpeg shows what the edit list keeps: from about 0.5 s on
    with FrameReader(files[name]) as reader:
        shown = [_mark(reader[k]) for k in range(reader.frames)]
    assert shown == truth[1]


@pytest.mark.parametrize("name", RUN_CASES)
def test_run_shows_the_frame_on_screen_at_each_output_time(corpus, name, tmp_path):
    d, files = corpus
    out = tmp_path / "out.mp4"
    audio = d / ("speech_in_a_video.mp4" if name == "mkv" else "speech.wav")  # also: the audio track of a video
    result = CliRunner().invoke(app, ["run", str(files[name]), str(audio), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    source, info = probe_video(files[name]), probe_video(out)
    assert (info.frames, info.width, info.height, info.rotation) == (OUT_FRAMES, source.width, source.height, 0)
    assert marks_shown(out) == expected_marks(cli_truth(files[name]))
    if name == "full_range":
        assert info.colour.range == "pc" and info.colour.space == source.colour.space


def test_the_output_keeps_the_colours_of_the_input(corpus, tmp_path):
    """Away from the face, output pixels match the input's as ffmpeg shows both: same matrix and range."""
    d, files = corpus
    for name in ("mkv", "full_range"):
        out = tmp_path / f"{name}.mp4"
        assert CliRunner().invoke(app, ["run", str(files[name]), str(d / "speech.wav"), "-o", str(out), *ARGS]).exit_code == 0
        src = subprocess.run(["ffmpeg", "-v", "error", "-i", str(files[name]), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        dst = subprocess.run(["ffmpeg", "-v", "error", "-i", str(out), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        a = np.frombuffer(src, np.uint8).reshape(496, 270, 3)[400:].astype(int)  # below the chin
        b = np.frombuffer(dst, np.uint8).reshape(496, 270, 3)[400:].astype(int)
        assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() < 1.5, name


def _packets(path) -> list[dict]:
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pos,size,flags", "-of", "json", str(path)],
                           capture_output=True, text=True, check=True)
    return json.loads(probe.stdout)["packets"]


def test_damaged_streams_give_a_valid_output_or_a_clear_error(corpus, tmp_path, caplog):
    d, files = corpus
    # the data of two frames in the middle zeroed: the output is complete, those frames borrow a neighbour
    ffmpeg("-i", str(d / "master.mp4"), "-c", "copy", "-movflags", "+faststart", str(tmp_path / "indexed.mp4"))
    data = bytearray((tmp_path / "indexed.mp4").read_bytes())
    for packet in _packets(tmp_path / "indexed.mp4")[20:22]:
        pos, size = int(packet["pos"]), int(packet["size"])
        data[pos : pos + size] = bytes(size)
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    with FrameReader(tmp_path / "damaged.mp4") as reader:
        assert len([reader[k] for k in range(reader.frames)]) == 60
    assert "does not decode" in caplog.text
    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "damaged.mp4"), str(d / "speech.wav"), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert probe_video(out).frames == OUT_FRAMES
    # cut short: what is there is used
    (tmp_path / "cut.mkv").write_bytes(files["mkv"].read_bytes()[: files["mkv"].stat().st_size // 3])
    assert 0 < probe_video(tmp_path / "cut.mkv").frames < 50
    # the moov atom lost (an mp4 cut before its index): one line naming the file, nothing written
    (tmp_path / "cut.mp4").write_bytes(files["rotated_90"].read_bytes()[:20_000])
    result = CliRunner().invoke(app, ["run", str(tmp_path / "cut.mp4"), str(d / "speech.wav"), "-o", str(out.with_name("x.mp4")), *ARGS])
    assert result.exit_code == 2 and "cut.mp4" in result.output and "Traceback" not in result.output
    assert not out.with_name("x.mp4").exists()


def test_a_frame_that_never_decodes_is_an_error_naming_the_file_and_time(corpus, tmp_path):
    """The second half of the frames' data zeroed while the index still lists them (more than a few frames):
    reading them is a MediaError, not an IndexError."""
    d, _ = corpus
    ffmpeg("-i", str(d / "master.mp4"), "-c", "copy", "-movflags", "+faststart", str(tmp_path / "indexed.mp4"))
    data = bytearray((tmp_path / "indexed.mp4").read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    (tmp_path / "zeroed.mp4").write_bytes(bytes(data))
    with FrameReader(tmp_path / "zeroed.mp4") as reader:
        assert reader.frames == 60
        with pytest.raises(MediaError, match=r"zeroed.mp4: the video cannot be decoded at \d+\.\d\d s"):
            for k in range(reader.frames):
                reader[k]


@pytest.mark.slow
def test_the_corpus_through_one_bulk_job(ray_local, corpus, tmp_path):
    """The same frame map on the Ray job's workers: each output shows the frames `run` shows."""
    d, files = corpus
    catalog = tmp_path / "catalog.parquet"
    pd.DataFrame([{"id": name, "video": str(files[name]), "audio": str(d / "speech.wav")} for name in RUN_CASES]).to_parquet(catalog)
    job = BatchConfig(
        catalog=str(catalog), output=str(tmp_path / "out"), pipeline=LipSyncConfig(model="tiny-random", steps=1, detector="offline"),
        prepare_actors=(2, 2), generate_actors=(1, 1),
    )
    manifest = {m.id: m for m in run_batch(job)}
    for name in RUN_CASES:
        assert manifest[name].status == "ok", (name, manifest[name].error)
        assert marks_shown(manifest[name].output) == expected_marks(cli_truth(files[name])), name


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    app = {"pipeline": {"model": "tiny-random", "steps": 1, "detector": "offline"}, "gpu": False,
           "work_dir": str(tmp_path_factory.mktemp("serve_work")), "prepare_replicas": (1, 1), "generate_replicas": (1, 1)}
    with serve_apps({"realworld": ("/", app)}) as base:
        yield base


@pytest.mark.slow
@pytest.mark.parametrize("name", ["webm_vp9_30fps", "vfr", "timestamp_gap", "rotated_90", "hevc_10bit"])
def test_the_corpus_through_serve(service, corpus, name, tmp_path):
    d, files = corpus
    response = httpx.post(f"{service}/v1/lipsync", timeout=300, files={
        "video": (files[name].name, files[name].read_bytes(), "application/octet-stream"),
        "audio": ("speech.wav", (d / "speech.wav").read_bytes(), "audio/wav"),
    })
    assert response.status_code == 200, response.text
    out = tmp_path / "out.mp4"
    out.write_bytes(response.content)
    source, info = probe_video(files[name]), probe_video(out)
    assert (info.frames, info.width, info.height, info.rotation) == (OUT_FRAMES, source.width, source.height, 0)
    assert marks_shown(out) == expected_marks(cli_truth(files[name]))
