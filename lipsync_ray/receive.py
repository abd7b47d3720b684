"""A Serve request's inputs: `RequestInputs` saves its two files (uploads or fetched URLs) and validates its
parameters. Bodies are read as they arrive: multipart files go straight to fixed names on disk and are cut off at
a byte limit, and everything is received by a deadline, so an oversized or stalled upload is refused while it
streams, never held whole in memory or written out in full. Errors are the InputRefused family of `storage`, or
InputError, naming the part (`video`, `audio`, a form field, or `body`)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from . import storage
from .config import EnhanceMode, LipSyncConfig, ServeConfig
from .plan import LengthMode
from .stages import MissingWeights, check_weights
from .storage import InputRefused, InputTimeout, InputTooLarge, safe_suffix

FIELD_BYTES = 1024  # a form field (steps, seed, ...) is short text
MAX_FIELDS = 16
JSON_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and fields around the files


class InputError(Exception):
    """A request that fails: HTTP `status` with the offending `field` named (none for a fault of ours)."""

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field_name, message


def invalid(err: ValidationError) -> InputError:
    first = err.errors()[0]
    return InputError(422, ".".join(map(str, first["loc"])) or "body", first["msg"])


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video_url: str
    audio_url: str
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=1.0, le=20.0)
    seed: int | None = None
    deepcache: int | None = Field(None, ge=0, le=10)
    face: str | None = None
    length: LengthMode | None = None
    enhance: EnhanceMode | None = None
    enhance_strength: float | None = Field(None, ge=0.0, le=1.0)


class RequestInputs:
    """A request's two inputs, saved under fixed names in its folder (multipart uploads or fetched URLs), and its
    per-request parameters, validated against the service's pipeline config."""

    PARAMS = ("steps", "guidance", "seed", "deepcache", "face", "length", "enhance", "enhance_strength")

    def __init__(self, config: ServeConfig):
        self.config = config

    async def __call__(self, request: Request, folder: Path) -> tuple[str, str, dict]:
        """Save the two inputs in `folder` under fixed names (uploads or URLs) and collect the per-request
        parameters, all within `input_timeout_s`."""
        deadline = time.monotonic() + self.config.input_timeout_s
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            files, raw = await multipart(request, folder, ("video", "audio"), self.config.max_upload_bytes, deadline)
            paths = [str(files["video"]), str(files["audio"])]
        else:
            try:
                body = JobRequest.model_validate(await json_body(request, deadline))
            except ValidationError as err:
                raise invalid(err) from None
            paths = [
                await asyncio.to_thread(self._fetch, url, folder, name, deadline)
                for name, url in (("video", body.video_url), ("audio", body.audio_url))
            ]
            raw = body.model_dump(exclude={"video_url", "audio_url"}, exclude_none=True)
        return paths[0], paths[1], self._params(raw)

    def options(self) -> dict[str, dict]:
        """Each per-request parameter's JSON schema (type, bounds, choices, description) with the service's own
        default: what a client such as the web page may set."""
        schema = type(self.config.pipeline).model_json_schema()["properties"]
        return {name: {**schema[name], "default": getattr(self.config.pipeline, name)} for name in self.PARAMS}

    @classmethod
    def openapi(cls) -> dict:
        """The request body of the routes that take inputs, for the OpenAPI docs (the routes read the request
        themselves): multipart files and form fields, or JSON URLs, with the per-request parameters."""
        body, described = JobRequest.model_json_schema(), LipSyncConfig.model_json_schema()
        for name in cls.PARAMS:
            body["properties"][name]["description"] = described["properties"][name]["description"]
        files = {name: {"type": "string", "format": "binary"} for name in ("video", "audio")}
        params = {name: body["properties"][name] for name in cls.PARAMS}
        form = {"type": "object", "required": ["video", "audio"], "properties": {**files, **params}}
        content = {"multipart/form-data": {"schema": form}, "application/json": {"schema": body}}
        return {"requestBody": {"required": True, "content": content}}

    def _fetch(self, url: str, folder: Path, name: str, deadline: float) -> str:
        target = folder / (name + safe_suffix(url))
        storage.fetch(url, target, f"{name}_url", self.config.inputs, self.config.storage_options, self.config.max_upload_bytes, deadline)
        return str(target)

    def _params(self, raw: dict) -> dict:
        unknown = set(raw) - set(self.PARAMS)
        if unknown:
            raise InputError(422, sorted(unknown)[0], "unknown parameter")
        try:
            merged = self.config.pipeline.with_params(raw)
        except ValidationError as err:
            raise invalid(err) from None
        try:
            check_weights(merged)
        except MissingWeights as err:  # the message names our paths: not for the client
            raise InputError(422, err.option, f"{getattr(merged, err.option)} is not available on this service") from None
        return {k: getattr(merged, k) for k in raw}


async def _body(request: Request, deadline: float, receiving: Callable[[], str]) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; InputTimeout naming `receiving()` (the part under way) once `deadline`
    (time.monotonic()) passes."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(deadline - time.monotonic(), 0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise InputTimeout(receiving(), "the request stalled: not received in time") from None
        yield chunk


def _check_length(request: Request, limit: int) -> None:
    """Refuse at once a body whose declared length is over `limit`, before reading any of it."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise InputTooLarge("body", f"{length} bytes is more than the {limit} allowed")


async def json_body(request: Request, deadline: float) -> Any:
    _check_length(request, JSON_BYTES)
    data = bytearray()
    async for chunk in _body(request, deadline, lambda: "body"):
        data += chunk
        if len(data) > JSON_BYTES:
            raise InputTooLarge("body", f"a JSON body is at most {JSON_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError:
        raise InputRefused("body", "expected multipart files or a JSON body") from None


async def multipart(request: Request, folder: Path, files: tuple[str, ...], limit: int, deadline: float) -> tuple[dict[str, Path], dict[str, str]]:
    """The file parts named in `files`, each written to `folder`/<name><its extension> (the client's file name is
    never a path) and at most `limit` bytes, and the other fields as text."""
    _check_length(request, len(files) * limit + MULTIPART_OVERHEAD)
    boundary = parse_options_header(request.headers["content-type"])[1].get(b"boundary")
    if not boundary:
        raise InputRefused("body", "a multipart body needs a boundary")
    form = _Form(folder, files, limit)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in _body(request, deadline, lambda: form.part or "body"):
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise InputRefused("body", "not a valid multipart body") from None
    finally:
        form.close()
    for name in files:
        if name not in form.files:
            raise InputRefused(name, "missing file field")
    return form.files, form.fields


class _Form:
    """python-multipart's callbacks: file data is written as it is parsed, fields are collected."""

    def __init__(self, folder: Path, names: tuple[str, ...], limit: int):
        self.folder, self.names, self.limit = folder, names, limit
        self.files: dict[str, Path] = {}
        self.fields: dict[str, str] = {}
        self.part = ""  # the part being received
        self._header: list[bytes] = [b"", b""]
        self._disposition = b""
        self._out = None  # the open file of a file part
        self._size = 0
        self._text = bytearray()

    def callbacks(self) -> dict[str, Callable]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished", "on_part_data", "on_part_end",
        )}

    def on_part_begin(self) -> None:
        self.part, self._disposition, self._size, self._text = "", b"", 0, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def on_header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def on_headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise InputRefused("body", "a multipart part has no name")
        if name in self.files or name in self.fields:
            raise InputRefused(name, "sent twice")
        self.part = name
        if b"filename" not in options:
            if len(self.fields) >= MAX_FIELDS:
                raise InputRefused(name, "too many fields")
            return
        if name not in self.names:
            raise InputRefused(name, "unknown file field")
        self.files[name] = self.folder / (name + safe_suffix(options[b"filename"].decode("utf-8", "replace")))
        self._out = open(self.files[name], "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._out is None:
            self._text += piece
            if len(self._text) > FIELD_BYTES:
                raise InputTooLarge(self.part, f"a field is at most {FIELD_BYTES} bytes")
            return
        self._size += len(piece)
        if self._size > self.limit:
            raise InputTooLarge(self.part, f"more than the {self.limit} bytes allowed")
        self._out.write(piece)

    def on_part_end(self) -> None:
        if self._out is None:
            self.fields[self.part] = self._text.decode("utf-8", "replace")
        self.close()
        self.part = ""

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
