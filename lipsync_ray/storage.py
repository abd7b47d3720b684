"""Files on any fsspec URL (s3://, gs://, local paths): local copies of inputs, atomic outputs, and the input
policy: which URLs a job or a request may read at all (`check_url`) and how much of them (`fetch`).

Credentials and endpoints come from the environment or fsspec config (for S3: the AWS_* variables including
AWS_ENDPOINT_URL, ~/.aws), or from `storage_options`; never from code. The endpoint of s3:// and gs:// is the
operator's, so only http(s) URLs name the host they reach, and only their hosts' addresses are checked.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urljoin, urlsplit, urlunsplit

import fsspec
import urllib3
from fsspec.core import split_protocol, url_to_fs

from .media import MediaError, VideoInfo

if TYPE_CHECKING:
    from .config import InputPolicy

LOCAL_PROTOCOLS = (None, "file", "local")  # what fsspec reads from this machine's disk
# cloud metadata services: AWS, GCP, Azure (169.254.169.254), AWS over IPv6, AWS ECS tasks, Azure's wireserver,
# Alibaba, Oracle
METADATA_ADDRESSES = frozenset(
    map(ipaddress.ip_address, ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "168.63.129.16", "100.100.100.200", "192.0.0.192"))
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
IPV6_HOST = re.compile(r"^https?://(?:[^/?#@]*@)?\[[^\]/?#]*\]", re.IGNORECASE)  # "::" belongs to the address there
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CHUNK = 1 << 20
MAX_REDIRECTS = 5
HTTP_TIMEOUT_S = 60.0  # per connection and read, for a fetch without a deadline of its own


class InputRefused(MediaError):
    """An input that the input policy refuses or that cannot be read. `field` names it; `message` is fit for a
    client (no resolved addresses, local paths or exception names); `detail`, for logs and manifests, may add more."""

    def __init__(self, field: str, message: str, detail: str = ""):
        super().__init__(f"{field}: {message}" + (f" ({detail})" if detail else ""))
        self.field, self.message = field, message


class InputTooLarge(InputRefused):
    """Over a limit: bytes, pixels or frames."""


class InputTimeout(InputRefused):
    """Not received within the time allowed."""


def check_url(url: str, field: str, policy: InputPolicy) -> list[str]:
    """Refuse (InputRefused naming `field`) a URL that `policy` does not let a job or request read: chained URLs
    (`a::b`), schemes outside `policy.protocols`, local paths unless `policy.local_paths`, and http(s) hosts that
    resolve to a non-public address (see `address_category`) unless allowed. Returns the checked addresses of an
    http(s) host for the caller to connect to: a second lookup could answer differently."""
    if "::" in IPV6_HOST.sub("", url, count=1):
        raise InputRefused(field, f"{url}: chained URLs (::) are not accepted")
    protocol = split_protocol(url)[0]
    schemes = ", ".join(f"{p}://" for p in policy.protocols)
    if protocol in LOCAL_PROTOCOLS:
        if not policy.local_paths:
            raise InputRefused(field, f"{url}: local paths are not accepted, only {schemes} URLs")
        return []
    if protocol not in policy.protocols:
        raise InputRefused(field, f"{url}: only {schemes} URLs are accepted")
    return _checked_addresses(url, field, policy) if protocol in ("http", "https") else []


def _checked_addresses(url: str, field: str, policy: InputPolicy) -> list[str]:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        host = None
    if not host:
        raise InputRefused(field, f"{url}: not a valid URL")
    try:
        addresses = [ipaddress.ip_address(host)]  # a literal address is judged without any lookup
    except ValueError:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise InputRefused(field, f"{url}: unknown host") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
    named = f"[{host}]" if ":" in host else host
    if not {host, named, f"{named}:{port}"} & {h.lower() for h in policy.allowed_hosts}:
        for address in addresses:  # every address the name has: a client cannot pick which one we connect to
            category = address_category(address)
            if category and not (category == "private" and policy.allow_private_networks):
                raise InputRefused(field, f"{url}: the host is on a {category} address, which is not accepted")
    return [str(a) for a in addresses]


def address_category(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of non-public address `address` is: "cloud metadata", "unspecified", "loopback", "link-local",
    "multicast", "reserved" or "private" (any other that is not globally routable); None for a public one. An IPv6
    address that carries an IPv4 one (IPv4-mapped or -compatible, NAT64, 6to4) is judged by that IPv4 address."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        if ip.ipv4_mapped or ip.sixtofour:
            ip = ip.ipv4_mapped or ip.sixtofour
        elif ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):  # not :: and ::1 themselves
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "private"


def fetch(
    url: str, target: Path, field: str, policy: InputPolicy, storage_options: dict[str, Any] | None = None,
    max_bytes: int | None = None, deadline: float | None = None,
) -> None:
    """Copy `url` to the local file `target` if `policy` accepts it, stopping beyond `max_bytes` (InputTooLarge)
    and past `deadline` (a time.monotonic() value; InputTimeout). http(s) is fetched here rather than by fsspec:
    every redirect is checked like the first URL, and connections go to the addresses that were checked."""
    partial = target.with_name(target.name + ".part")
    try:
        if split_protocol(url)[0] in ("http", "https"):
            _fetch_http(url, partial, field, policy, max_bytes, deadline)
        else:
            check_url(url, field, policy)
            _fetch_fsspec(url, partial, field, storage_options, max_bytes, deadline)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(target)


def _fetch_fsspec(url, partial: Path, field: str, storage_options, max_bytes: int | None, deadline: float | None) -> None:
    try:
        fs, path = filesystem(url, storage_options)
        size = fs.size(path)
        if max_bytes is not None and size is not None and size > max_bytes:
            raise InputTooLarge(field, f"{url}: {size} bytes is more than the {max_bytes} allowed")
        with fs.open(path, "rb") as source:
            _copy(source.read, partial, url, field, max_bytes, deadline)
    except FileNotFoundError:
        raise InputRefused(field, f"{url}: no such object") from None
    except InputRefused:
        raise
    except Exception as err:  # noqa: BLE001 - permissions, network, bad bucket: one line, the detail for logs only
        raise InputRefused(field, f"{url}: cannot be read", f"{type(err).__name__}: {err}") from None


def _fetch_http(url: str, partial: Path, field: str, policy: InputPolicy, max_bytes: int | None, deadline: float | None) -> None:
    location = url
    for hop in range(MAX_REDIRECTS + 1):
        try:
            addresses = check_url(location, field, policy)
        except InputRefused as err:
            if not hop:
                raise
            raise InputRefused(field, f"{url}: redirected to a location that is not accepted", err.message) from None
        with _http_get(location, addresses, url, field, deadline) as response:
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("location"):
                location = urljoin(location, response.headers["location"])
                continue
            if response.status != 200:
                raise InputRefused(field, f"{url}: " + ("no such object" if response.status == 404 else f"answered HTTP {response.status}"))
            length = response.headers.get("content-length", "")
            if max_bytes is not None and length.isdigit() and int(length) > max_bytes:
                raise InputTooLarge(field, f"{url}: {length} bytes is more than the {max_bytes} allowed")
            _copy(response.read1, partial, url, field, max_bytes, deadline)
            return
    raise InputRefused(field, f"{url}: more than {MAX_REDIRECTS} redirects")


@contextmanager
def _http_get(url: str, addresses: list[str], shown: str, field: str, deadline: float | None) -> Iterator[urllib3.BaseHTTPResponse]:
    """GET `url` from the first of its checked `addresses` that answers (TLS still verifies the URL's host name).
    Each connection and read waits until the deadline at most; `_copy` checks the deadline between reads."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    wait = HTTP_TIMEOUT_S if deadline is None else max(deadline - time.monotonic(), 0.01)
    tls = {"server_hostname": parts.hostname, "assert_hostname": parts.hostname} if https else {}
    pool_class = urllib3.HTTPSConnectionPool if https else urllib3.HTTPConnectionPool
    path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    failure: Exception | None = None
    for address in addresses:
        pool = pool_class(address, parts.port or (443 if https else 80), timeout=wait, retries=False, maxsize=1, **tls)
        try:
            response = pool.urlopen(
                "GET", path, headers={"Host": parts.netloc.rpartition("@")[2]}, redirect=False,
                preload_content=False, assert_same_host=False,
            )
        except urllib3.exceptions.HTTPError as err:
            failure = err
            pool.close()
            continue
        try:
            yield response
        except urllib3.exceptions.HTTPError as err:  # the connection broke or timed out while reading
            if isinstance(err, urllib3.exceptions.TimeoutError):
                raise InputTimeout(field, f"{shown}: not received in time") from None
            raise InputRefused(field, f"{shown}: cannot be fetched", type(err).__name__) from None
        finally:
            response.release_conn()
            pool.close()
        return
    if isinstance(failure, urllib3.exceptions.TimeoutError):
        raise InputTimeout(field, f"{shown}: not received in time")
    raise InputRefused(field, f"{shown}: cannot be fetched", type(failure).__name__)


def _copy(read: Callable[[int], bytes], partial: Path, url: str, field: str, max_bytes: int | None, deadline: float | None) -> None:
    size = 0
    with open(partial, "wb") as out:
        while data := read(CHUNK):
            size += len(data)
            if max_bytes is not None and size > max_bytes:
                raise InputTooLarge(field, f"{url}: more than the {max_bytes} bytes allowed")
            if deadline is not None and time.monotonic() > deadline:
                raise InputTimeout(field, f"{url}: not received in time")
            out.write(data)


def check_video(info: VideoInfo, policy: InputPolicy, field: str = "video", name: str = "") -> None:
    """Refuse (InputTooLarge, its message starting with `name` where given) a probed video over `policy`'s size
    limits, before any of it is decoded."""
    named = f"{name}: " if name else ""
    if info.width * info.height > policy.max_video_pixels:
        raise InputTooLarge(field, f"{named}{info.width}x{info.height} is more than the {policy.max_video_pixels} pixels allowed")
    if info.frames > policy.max_video_frames:
        raise InputTooLarge(field, f"{named}{info.frames} frames is more than the {policy.max_video_frames} allowed")


def safe_name(raw: str) -> str:
    """`raw` as a file or object name: itself when it is one already (letters, digits, `._-`, at most 100, starting
    with a letter or digit), else its safe characters and a hash of `raw`, so that distinct names stay distinct."""
    if SAFE_NAME.fullmatch(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._-")[:80]
    return f"{cleaned or 'input'}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


def safe_suffix(name: str) -> str:
    """The extension of a client's file name or URL when it is a plain one (decoders may go by it), else ""."""
    suffix = os.path.splitext(urlsplit(name).path if "://" in name else name)[1].lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,10}", suffix) else ""


def below(url: str, prefix: str) -> list[str] | None:
    """The path segments of `url` below `prefix` (the same scheme, bucket and folders), or None when `url` is not
    under it, is a chained URL or has `.` or `..` segments."""
    if "::" in url or {".", ".."} & set(split_protocol(url)[1].split("/")):
        return None
    (scheme, parts), (base_scheme, base) = _segments(url), _segments(prefix)
    if scheme != base_scheme or parts[: len(base)] != base or len(parts) == len(base):
        return None
    return parts[len(base) :]


def _segments(url: str) -> tuple[str, list[str]]:
    protocol, path = split_protocol(url)
    if protocol in LOCAL_PROTOCOLS:
        return "file", [s for s in os.path.abspath(path).split("/") if s]
    return protocol, [s for s in path.split("/") if s]


def is_local(url: str | Path) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def join(prefix: str, *parts: str) -> str:
    return "/".join([str(prefix).rstrip("/"), *parts])


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(str(url), **(storage_options or {}))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


class InputCache:
    """Local copies of inputs for decoders that need a file, in a per-process folder that keeps the `keep` most
    recently used files (chunks of one video arrive together, so a small cache suffices): remote URLs, read under
    `policy`, and bytes shipped by another process (`put`). Safe to call from several threads: a file is whole
    before any thread sees it."""

    def __init__(self, policy: InputPolicy, storage_options: dict[str, Any] | None = None, keep: int = 4):
        self.policy = policy
        self.storage_options = storage_options
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="lipsync-inputs-"))
        self._recent: list[Path] = []
        self._lock = threading.Lock()

    def local(self, url: str, field: str = "input") -> str:
        """A local path holding `url`'s bytes; raises InputRefused (a MediaError) naming `field` and the URL when
        the policy refuses it or it cannot be read."""
        if is_local(url):
            check_url(url, field, self.policy)
            path = str(url).removeprefix("file://")
            if not os.path.exists(path):
                raise InputRefused(field, f"{url}: no such file")
            return path
        name = os.path.basename(url.rstrip("/"))  # errors about the copy then name the input's file
        name = name if SAFE_NAME.fullmatch(name) else "input" + safe_suffix(url)
        return self._kept(url, name, lambda target: fetch(url, target, field, self.policy, self.storage_options))

    def put(self, name: str, digest: str, data: bytes) -> str:
        """A local file `name` holding `data`, whose `digest` keys it: written once, however often it arrives."""
        def write(target: Path) -> None:
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(data)
            partial.rename(target)

        return self._kept(digest, name, write)

    def _kept(self, key: str, name: str, write: Callable[[Path], Any]) -> str:
        folder = self.root / hashlib.sha1(key.encode()).hexdigest()[:16]
        target = folder / name
        with self._lock:
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                write(target)
            if folder in self._recent:
                self._recent.remove(folder)
            self._recent.append(folder)
            for old in self._recent[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self._recent = self._recent[-self.keep :]
        return str(target)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def upload_atomic(local: str | Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Put a finished local file at `url` so that no partial object is ever visible there: object stores
    publish a PUT only when complete; local and POSIX-like targets get a temporary name and a rename."""
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
    else:
        fs.put_file(str(local), path)


def write_bytes_atomic(data: bytes, url: str, storage_options: dict[str, Any] | None = None) -> None:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        upload_atomic(f.name, url, storage_options)
    finally:
        os.unlink(f.name)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
