"""Video catalogs (Parquet, CSV or JSON Lines on any fsspec URL) and the job manifest (Parquet)."""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

# per-row parameters a catalog may set; the model and its resolution are fixed per job (one model per actor)
ROW_PARAMETERS = ("steps", "guidance", "seed", "scheduler", "deepcache", "face", "on_no_face", "length", "enhance",
                  "enhance_strength")


class CatalogError(ValueError):
    pass


@dataclass
class CatalogRow:
    id: str
    video: str
    audio: str
    output: str
    params: dict[str, Any] = field(default_factory=dict)


def read_catalog(
    url: str, output_prefix: str, storage_options: dict[str, Any] | None = None, output_prefixes: tuple[str, ...] = ()
) -> list[CatalogRow]:
    """Rows of `url` (.parquet, .csv, .jsonl/.json): columns video and audio, optional id, output and any of
    ROW_PARAMETERS. Ids default to the video's file name and become safe object names (`storage.safe_name`);
    outputs default to `<output_prefix>/<id>.mp4`, and a row's own output must be an .mp4 below `output_prefix` or
    one of `output_prefixes`, outside hidden folders (the job's .staging)."""
    import pandas as pd  # the driver reads catalogs; workers import this module for its row types

    options = {"storage_options": storage_options} if not storage.is_local(url) else {}
    ext = os.path.splitext(url.rstrip("/"))[1].lower()
    try:
        if ext == ".parquet":
            table = pd.read_parquet(url, **options)
        elif ext == ".csv":
            table = pd.read_csv(url, dtype=str, keep_default_na=False, **options)
        elif ext in (".jsonl", ".json"):
            table = pd.read_json(url, lines=True, dtype=False, **options)
        else:
            raise CatalogError(f"{url}: catalog must be .parquet, .csv or .jsonl")
    except FileNotFoundError:
        raise CatalogError(f"{url}: no such catalog") from None
    missing = {"video", "audio"} - set(table.columns)
    if missing:
        raise CatalogError(f"{url}: missing column(s) {', '.join(sorted(missing))} (have {', '.join(table.columns)})")
    rows = []
    for record in table.to_dict("records"):
        present = {k: v for k, v in record.items() if v is not None and v == v and v != ""}  # drop NaN and blanks
        video = str(present["video"])
        rid = storage.safe_name(str(present.get("id") or os.path.splitext(os.path.basename(video))[0]))
        params = {k: _number(present[k]) for k in ROW_PARAMETERS if k in present}
        output = str(present.get("output") or storage.join(output_prefix, f"{rid}.mp4"))
        rows.append(CatalogRow(rid, video, str(present["audio"]), output, params))
    outside = [r.output for r in rows if not _output_allowed(r.output, (output_prefix, *output_prefixes))]
    if outside:
        raise CatalogError(f"{url}: outputs must be .mp4 files below {output_prefix}: not {', '.join(outside[:3])}")
    for column, hint in (("id", " (add an id column)"), ("output", "")):
        dupes = sorted(v for v, n in Counter(getattr(r, column) for r in rows).items() if n > 1)
        if dupes:
            raise CatalogError(f"{url}: duplicate {column}s {', '.join(dupes)}{hint}")
    return rows


def _output_allowed(output: str, prefixes: tuple[str, ...]) -> bool:
    for prefix in prefixes:
        below = storage.below(output, prefix)
        if below and below[-1].endswith(".mp4") and not any(s.startswith(".") for s in below):
            return True
    return False


def _number(value: Any) -> Any:
    """Plain Python values for the JSON that carries rows to workers (Parquet cells arrive as numpy scalars;
    CSV text is converted by pydantic when the config is built)."""
    return value.item() if hasattr(value, "item") else value


@dataclass
class ManifestRow:
    id: str
    video: str
    audio: str
    output: str
    status: str  # ok | low_sync (scored below --min-confidence; the output is kept) | failed | skipped
    error: str = ""
    frames: int = 0
    input_seconds: float = 0.0
    output_seconds: float = 0.0
    chunks: int = 0
    chunks_reused: int = 0
    prepare_s: float = 0.0
    generate_s: float = 0.0
    compose_s: float = 0.0
    enhance_s: float = 0.0  # of compose_s: restoring faces
    score_s: float = 0.0  # --score: scoring the output, after compose_s
    lse_c: float | None = None  # --score: SyncNet confidence (higher is better)
    lse_d: float | None = None  # --score: SyncNet distance (lower is better)
    av_offset: int | None = None  # --score: frames between the mouth and the audio
    workers: list[str] = field(default_factory=list)  # the Generate actors that ran this video's chunks


MANIFEST_SCHEMA = pa.schema(
    [(f, pa.string()) for f in ("id", "video", "audio", "output", "status", "error")]
    + [("frames", pa.int64())]
    + [(f, pa.float64()) for f in ("input_seconds", "output_seconds")]
    + [(f, pa.int64()) for f in ("chunks", "chunks_reused")]
    + [(f, pa.float64()) for f in ("prepare_s", "generate_s", "compose_s", "enhance_s", "score_s", "lse_c", "lse_d")]
    + [("av_offset", pa.int64())]
    + [("workers", pa.list_(pa.string()))]
)


def write_manifest(rows: list[ManifestRow], url: str, storage_options: dict[str, Any] | None = None) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=MANIFEST_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(buffer.getvalue(), url, storage_options)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options))).to_pandas()
