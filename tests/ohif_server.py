"""The OHIF viewer for tests: fetched once with npm, served beside a proxy to Orthanc.

OHIF's prebuilt ``dist/`` (``npm pack @ohif/app@VERSION``) is cached in ``tests/.cache/ohif/``
with an ``app-config.js`` whose only data source is DICOMweb on the page's own origin.
:class:`OhifServer` serves that folder and forwards ``/dicom-web`` and ``/wado`` to Orthanc
from the same origin (Orthanc 1.10 sends no CORS headers), passing the browser's Host header
on so that the DICOMweb plugin writes BulkDataURIs that point back at this server. Unknown
paths (``/viewer?...``, client-side routes) get ``index.html``.

No pytest here: missing npm or an unreachable registry raise :class:`peers.PeerUnavailable`.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import mimetypes
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

from peers import PeerUnavailable, free_port

logger = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "ohif"
PROXIED_PREFIXES = ("/dicom-web", "/wado")
CHUNK_BYTES = 256 * 1024

# Replaces the shipped app-config.js (which points at a public demo server).
APP_CONFIG_JS = """\
/** dicom-node tests: one DICOMweb data source, Orthanc behind the page's own origin. */
window.config = {
  name: 'dicom-node-tests',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (dicom-node tests)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".webmanifest": "application/manifest+json",
}

# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded in either direction.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def content_type(path: Path) -> str:
    known = CONTENT_TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


# -- obtaining OHIF ----------------------------------------------------------------------------


def ohif_dist(cache_dir: Path = CACHE_DIR, *, timeout_s: float = 300.0) -> Path:
    """``cache_dir/dist``: OHIF's prebuilt viewer with our ``app-config.js``.

    The npm tarball is downloaded once (``npm pack``) and extracted once; both steps go through
    a temporary name and a rename, so an interrupted run leaves nothing half-made behind.
    Raises :class:`PeerUnavailable` when npm is absent or the registry cannot be reached.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    dist = cache_dir / "dist"
    if not (dist / "index.html").is_file():
        tarball = _ohif_tarball(cache_dir, timeout_s=timeout_s)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".extract-") as tmp:
            with tarfile.open(tarball) as archive:
                members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
                archive.extractall(tmp, members=members, filter="data")
            shutil.rmtree(dist, ignore_errors=True)
            (Path(tmp) / "package" / "dist").rename(dist)
    config = dist / "app-config.js"
    if not config.is_file() or config.read_text() != APP_CONFIG_JS:
        config.write_text(APP_CONFIG_JS)
    return dist


def _ohif_tarball(cache_dir: Path, *, timeout_s: float) -> Path:
    tarball = cache_dir / f"ohif-app-{OHIF_VERSION}.tgz"
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise PeerUnavailable("npm is not installed: cannot fetch the OHIF viewer")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pack-") as tmp:
        try:
            packed = subprocess.run(
                [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", tmp],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PeerUnavailable(
                f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} timed out (registry unreachable?)"
            ) from exc
        made = list(Path(tmp).glob("*.tgz"))
        if packed.returncode != 0 or len(made) != 1:
            raise PeerUnavailable(
                f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed (registry unreachable?): "
                + packed.stderr.strip()[-500:]
            )
        made[0].rename(tarball)
    return tarball


# -- serving it --------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects go back to the browser unchanged, as a proxy should."""

    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # -- dispatch ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if any(path == p or path.startswith(p + "/") for p in PROXIED_PREFIXES):
                self._proxy()
            elif self.command in ("GET", "HEAD"):
                self._static(path)
            else:
                self._plain(405, b"method not allowed\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away (cancelled fetch)

    # -- static files ------------------------------------------------------------------------
    def _static(self, url_path: str) -> None:
        root = self.server.dist
        relative = urllib.parse.unquote(url_path).lstrip("/")
        candidate = (root / relative).resolve() if relative else root / "index.html"
        if not candidate.is_relative_to(root) or not candidate.is_file():
            candidate = root / "index.html"  # SPA fallback: client-side routes
        size = candidate.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", content_type(candidate))
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(candidate, "rb") as source:
            shutil.copyfileobj(source, self.wfile, CHUNK_BYTES)

    # -- the proxy to Orthanc ----------------------------------------------------------------
    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(
            self.server.upstream + self.path, data=body, method=self.command
        )
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                request.add_header(name, value)  # Host included: Orthanc builds URLs from it
        try:
            response: http.client.HTTPResponse | urllib.error.HTTPError = _OPENER.open(
                request, timeout=300
            )
        except urllib.error.HTTPError as error:
            response = error  # 4xx/5xx: forward status and body as they are
        except urllib.error.URLError as error:
            self.server.errors.append(f"{self.command} {self.path}: {error.reason}")
            self._plain(502, f"Orthanc unreachable: {error.reason}\n".encode())
            return
        with contextlib.closing(response):
            status = response.status if isinstance(response, http.client.HTTPResponse) else None
            self._relay(status or response.getcode() or 502, response.headers.items(), response)

    def _relay(self, status: int, headers: list[tuple[str, str]], body: BinaryIO) -> None:
        if status >= 400:
            self.server.errors.append(f"{self.command} {self.path}: HTTP {status}")
        self.send_response(status)
        length = None
        for name, value in headers:
            if name.lower() in HOP_BY_HOP:
                continue
            if name.lower() == "content-length":
                length = value
            self.send_header(name, value)
        if length is None:
            # Unknown length (Orthanc streamed it chunked): the end of the body is the close.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        while chunk := body.read(CHUNK_BYTES):
            self.wfile.write(chunk)

    def _plain(self, status: int, text: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(text)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("ohif-server %s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, upstream: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist = dist.resolve()
        self.upstream = upstream.rstrip("/")
        self.errors: list[str] = []


class OhifServer:
    """OHIF's ``dist`` and a proxy to Orthanc (``upstream``, e.g. ``http://127.0.0.1:8042``)
    on one free loopback port, in a background thread; a context manager."""

    def __init__(self, dist: Path, upstream: str) -> None:
        self.port = free_port()
        self._server = _Server(self.port, dist, upstream)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ohif-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def errors(self) -> list[str]:
        """Proxied requests that failed (HTTP >= 400 from Orthanc, or Orthanc unreachable)."""
        return list(self._server.errors)

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
