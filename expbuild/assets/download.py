"""Download one URI over HTTP(S) straight into the CAS, bounded and checked.

The body streams into a temporary file of the store while it is hashed (SHA-256 for its
digest, plus whatever `checksum.sri` asks for); it is published under its digest only when
it is complete, within the size bound and matches the checksums, so a failed download
leaves nothing behind. Blocking: run it in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from google.rpc import code_pb2

from expbuild import __version__
from expbuild.assets.qualifiers import Qualifiers
from expbuild.cas.layout import unlink_quiet
from expbuild.cas.store import FileStore
from expbuild.digest import Digest, new_hasher
from expbuild.errors import ExpBuildError, InvalidArgument, NotFound, ResourceExhausted
from expbuild.text import quoted

USER_AGENT = f"ExpBuild-remote-asset/{__version__}"
SCHEMES = ("http", "https")
_CHUNK = 256 * 1024
# No single socket read waits longer than this, so the deadline is checked often enough.
_SOCKET_TIMEOUT = 30.0


class DownloadFailed(ExpBuildError):
    """The server could not get the content (connection refused, HTTP 5xx, bad TLS)."""

    code = code_pb2.UNAVAILABLE


class DownloadTimedOut(ExpBuildError):
    code = code_pb2.DEADLINE_EXCEEDED


class _HttpRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (never ftp: or file:), and do not carry the
    `http_header:` qualifiers (credentials, often) to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in SCHEMES:
            raise DownloadFailed(
                f"{quoted(req.full_url)}: redirected to {quoted(newurl)}, which is not "
                f"{' or '.join(SCHEMES)}"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            for name in [n for n in new.headers if n.lower() != "user-agent"]:
                del new.headers[name]
        return new


_OPENER = urllib.request.build_opener(_HttpRedirects)


@dataclass(frozen=True)
class Downloaded:
    uri: str
    digest: Digest


def check_uri(uri: str) -> None:
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidArgument(
            f"{quoted(uri)}: scheme {scheme or '(none)'!r} is not fetched; this server "
            f"downloads {' and '.join(SCHEMES)} URIs"
        )


def download(
    store: FileStore, uri: str, qualifiers: Qualifiers, max_bytes: int, deadline: float
) -> Downloaded:
    """Fetch `uri` into `store`; `deadline` is a time.monotonic() value."""
    check_uri(uri)
    request = urllib.request.Request(uri, headers={"User-Agent": USER_AGENT})
    for name, value in qualifiers.headers:
        request.add_header(name, value)
    tmp = store.tmp_dir / f"asset-{uuid.uuid4().hex}"
    try:
        with _open(request, uri, deadline) as response, open(tmp, "xb") as out:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise _too_large(uri, int(length), max_bytes)
            digest = _copy(response, out, uri, qualifiers, max_bytes, deadline)
            store.layout.finish_file(out)
        if store.layout.present(digest, touch=True):
            unlink_quiet(tmp)
        else:
            store.layout.publish(tmp, store.path_of(digest))
        return Downloaded(uri, digest)
    except BaseException:
        unlink_quiet(tmp)
        raise


def _open(request: urllib.request.Request, uri: str, deadline: float):
    timeout = min(_SOCKET_TIMEOUT, max(deadline - time.monotonic(), 0.001))
    try:
        return _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (404, 410):
            raise NotFound(f"{quoted(uri)}: HTTP {exc.code} {exc.reason}") from None
        raise DownloadFailed(f"{quoted(uri)}: HTTP {exc.code} {exc.reason}") from None
    except TimeoutError:
        raise DownloadTimedOut(f"{quoted(uri)}: no answer before the deadline") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise DownloadTimedOut(f"{quoted(uri)}: no answer before the deadline") from None
        raise DownloadFailed(f"{quoted(uri)}: {reason}") from None


def _copy(response, out, uri: str, qualifiers: Qualifiers, max_bytes: int, deadline: float):
    hasher = new_hasher()
    checks = qualifiers.hashers()
    received = 0
    while True:
        if time.monotonic() > deadline:
            raise DownloadTimedOut(f"{quoted(uri)}: download unfinished at the deadline")
        try:
            chunk = response.read(_CHUNK)
        except TimeoutError:
            raise DownloadTimedOut(f"{quoted(uri)}: the server stopped sending") from None
        except OSError as exc:
            raise DownloadFailed(f"{quoted(uri)}: {exc}") from None
        if not chunk:
            break
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(uri, received, max_bytes)
        hasher.update(chunk)
        for h in checks.values():
            h.update(chunk)
        out.write(chunk)
    mismatch = qualifiers.mismatch(checks)
    if mismatch:
        # Not this URI's fault alone: the asset asked for is not there.
        raise NotFound(f"{quoted(uri)}: {mismatch}")
    return Digest(hasher.hexdigest(), received)


def _too_large(uri: str, size: int, max_bytes: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"{quoted(uri)}: {size} bytes or more, over this server's limit of {max_bytes} "
        "([asset] max_download_size)"
    )
