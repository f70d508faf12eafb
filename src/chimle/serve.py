"""`chimle serve`: a web page to draw samples, choose one, vary it and download it.

    chimle serve --model runs/sr                                   # then open http://127.0.0.1:8000
    chimle serve                                                   # every built-in model (chimle models)
    chimle serve --model runs/sr --model runs/night2day --port 8080
    chimle serve --model runs/sr --tile 32 --overlap 8 --device cuda

The page (src/chimle/web/) takes an uploaded image or a built-in example, draws n samples with a progress bar,
and lets a person choose one and vary it as many times as they like: keep its coarse levels and redraw the
finer ones ("vary details"), or keep the fine levels and redraw the coarse ones ("vary structure"). Every
image is named by its per-level code sources (see chimle.sample); the download is the image at full
resolution as a PNG that records them, with the `chimle sample --sources` command that renders it again.

Standard library only: http.server's ThreadingHTTPServer, JSON endpoints, uploads as the raw request body.

    GET  /                        the page; /app.js, /style.css its script and style (a fixed list)
    GET  /api/models              the models, built-in examples and limits
    POST /api/images              raw image bytes (X-Filename: its name) -> {id, name, width, height}
    POST /api/examples            {model, example} -> a built-in photo prepared for the model, as an upload
    GET  /api/images/ID.png       an input as PNG (preview); /api/images/ID/original: the bytes as uploaded
    POST /api/jobs                {model, image, n, seed?, base?, keep?} -> {id, seed}; rendered in the background
    GET  /api/jobs/ID             {state, done, total, error, results}; /api/jobs/ID/K.png: result K
    GET  /api/download?model=M&image=ID&sources=S:K,...   the image those sources name, as an attachment

Safety: binds to 127.0.0.1 unless told otherwise, and then answers only requests addressed to localhost
(DNS rebinding); uploads are limited in bytes and pixels, sniffed for their type and fully decoded before
use; no part of a URL or file name reaches the file system (uploads live under random ids in a private
temporary folder, removed when the server stops, by Ctrl+C or SIGTERM); JSON requests must say so (a cross-site
form cannot send them); one lock serialises every use of the models, and a full queue (requests and downloads
that render) is refused rather than piling up. Under load or hostile clients: a connection that sends nothing
for `client_timeout` seconds, or takes four times that to send one request, is closed; connections beyond a cap
(kept well below the process's file-descriptor limit) get an immediate 503; finished results are kept up to a
number of bytes; a client that goes away mid-answer is forgotten quietly.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import json
import re
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


from chimle import builtin
from chimle.config import ConfigError
from chimle.data import load_image
from chimle.sample import Model, png_bytes
from chimle.session import USER_ERRORS, App, HTTPError, Limits, Upload

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
LOCAL_NAMES = {"localhost", "127.0.0.1", "[::1]"}
SIMPLE_TYPES = {"text/plain", "multipart/form-data", "application/x-www-form-urlencoded"}  # no CORS preflight
ID = r"([0-9a-f]{16})"


def model_names(paths: list[str]) -> list[str]:
    """A short unique name per model: its run directory (or file stem; builtin-TASK for a built-in model),
    numbered if repeated."""
    names = []
    for path in paths:
        p = Path(path)
        if builtin.is_builtin(path):
            name = "builtin-" + path[len(builtin.PREFIX):]
        else:
            name = p.parent.name if p.name == "model.safetensors" else (p.name if p.is_dir() else p.stem)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"
        names.append(name if name not in names else f"{name}-{names.count(name) + 1}")
    return names


def clean_name(name: str) -> str:
    """A file name as given, reduced to a safe display name (no folders, no odd characters)."""
    name = re.split(r"[/\\]", unquote(name or ""))[-1]
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip(" .")[:80]
    return name or "upload"


class Handler(BaseHTTPRequestHandler):
    server_version = "chimle"
    routes = [
        ("GET", r"/api/models", "models"), ("POST", r"/api/images", "add_image"),
        ("POST", r"/api/examples", "example"), ("GET", rf"/api/images/{ID}\.png", "preview"),
        ("GET", rf"/api/images/{ID}/original", "original"), ("POST", r"/api/jobs", "submit"),
        ("GET", rf"/api/jobs/{ID}", "job"), ("GET", rf"/api/jobs/{ID}/(\d{{1,3}})\.png", "result"),
        ("GET", r"/api/download", "download"),
    ]

    @property
    def app(self) -> App:
        return self.server.app

    def setup(self) -> None:
        """Reads from the client go through a _Deadline: an idle limit per read, a time limit per request."""
        super().setup()
        self.connection.settimeout(self.server.app.limits.client_timeout)
        self.rfile.close()  # the plain reader super() made, replaced by one with deadlines
        self.reader = _Deadline(self.connection, self.server.app.limits.client_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + REQUEST_TIME * self.server.app.limits.client_timeout
        super().handle_one_request()

    def do_GET(self):
        self.handle_request("GET")

    def do_POST(self):
        self.handle_request("POST")

    def do_HEAD(self):
        self.handle_request("HEAD")

    def do_PUT(self):
        self.handle_request("PUT")

    def do_DELETE(self):
        self.handle_request("DELETE")

    def do_PATCH(self):
        self.handle_request("PATCH")

    def do_OPTIONS(self):
        self.handle_request("OPTIONS")

    def handle_request(self, method: str) -> None:
        try:
            self.respond(method)
        except TimeoutError:  # the request's body did not arrive in time
            self.close_connection = True
            try:
                self.send_json({"error": "the request took too long to arrive; send it again"}, 408)
            except OSError:
                pass
        except ConnectionError:  # the client went away (closed, reset): there is no one to answer
            self.close_connection = True

    def respond(self, method: str) -> None:
        """Route the request; every failure becomes an answer with a status and a message."""
        try:
            self.check_host()
            url = urlsplit(self.path)
            if method == "GET" and url.path in STATIC:
                name, kind = STATIC[url.path]
                return self.send(200, self.server.files[name], kind)
            allowed = ["GET"] if url.path in STATIC else []
            for verb, pattern, action in self.routes:
                match = re.fullmatch(pattern, url.path)
                if match and verb == method:
                    return getattr(self, f"api_{action}")(*match.groups(), query=url.query)
                if match:
                    allowed.append(verb)
            if allowed:
                raise HTTPError(405, f"{method} is not allowed at {url.path}; use {' or '.join(allowed)}",
                                {"Allow": ", ".join(allowed)})
            raise HTTPError(404, f"nothing at {url.path}")
        except HTTPError as error:
            if method not in ("GET", "POST"):
                self.close_connection = True  # its body, if any, was not read
            self.send_json({"error": str(error)}, error.status, error.headers)
        except USER_ERRORS as error:
            self.send_json({"error": str(error)}, 400)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as error:  # noqa: BLE001 - one bad request must not take the server down
            traceback.print_exc()
            self.send_json({"error": f"internal error: {error.__class__.__name__}: {error}"}, 500)

    def check_host(self) -> None:
        """When serving this machine only, answer only requests addressed to it (a DNS-rebinding guard)."""
        if self.server.local_only:
            host = (self.headers.get("Host") or "").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host not in LOCAL_NAMES:
                raise HTTPError(403, f"this server answers requests for localhost only, not {host!r}; "
                                     "start it with --host to serve other names")

    def body(self, limit: int, json_body: bool) -> bytes:
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if json_body and kind != "application/json":
            raise HTTPError(415, "send JSON with Content-Type: application/json")
        if not json_body and (kind in SIMPLE_TYPES or not kind):
            raise HTTPError(415, "send the image as the raw request body with its type (e.g. image/png)")
        length = self.headers.get("Content-Length")
        if length is None or not re.fullmatch(r"[0-9]{1,15}", length.strip()):
            self.close_connection = True
            raise HTTPError(411, "the request needs a Content-Length: the size of its body in bytes, in digits 0-9")
        length = int(length)
        if length > limit:
            # Read it all (up to a point), so that the browser sees the answer instead of a reset connection.
            remaining = length if length <= 8 * limit else 0
            while remaining > 0 and (chunk := self.rfile.read(min(2**20, remaining))):
                remaining -= len(chunk)
            self.close_connection = True
            if json_body:
                raise HTTPError(413, f"the request is {length:,} bytes; the most this server reads is {limit:,}")
            raise HTTPError(413, f"the file is {length / 2**20:.1f} MB; this server takes up to "
                                 f"{limit / 2**20:.0f} MB: downscale or compress it first")
        return self.rfile.read(length)

    def json(self) -> dict:
        try:
            value = json.loads(self.body(self.app.limits.json_bytes, json_body=True))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, a number with too many digits
            raise HTTPError(400, "the request body is not valid JSON (or is nested too deep, or holds a number with "
                                 "too many digits)") from None
        if not isinstance(value, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return value

    # Endpoints ------------------------------------------------------------------------------------------------

    def api_models(self, query):
        self.send_json(self.app.describe())

    def api_add_image(self, query):
        name = clean_name(self.headers.get("X-Filename", ""))
        self.send_json(self.upload_info(self.app.add_image(self.body(self.app.limits.upload_bytes, False), name)))

    def api_example(self, query):
        request = self.json()
        self.send_json(self.upload_info(self.app.example(request.get("model"), request.get("example"))))

    def api_preview(self, image_id, query):
        upload = self.app.upload(image_id)
        if upload.path.suffix == ".png":
            return self.send(200, upload.path.read_bytes(), "image/png")
        self.send(200, png_bytes(load_image(upload.path)), "image/png")

    def api_original(self, image_id, query):
        upload = self.app.upload(image_id)
        self.send(200, upload.path.read_bytes(), "application/octet-stream",
                  {"Content-Disposition": f'attachment; filename="{upload.name}"'})

    def api_submit(self, query):
        job = self.app.submit(self.json())
        self.send_json({"id": job.id, "seed": job.seed, "total": len(job.sources)}, 202)

    def api_job(self, job_id, query):
        self.send_json(self.app.status(self.app.job(job_id)))

    def api_result(self, job_id, k, query):
        job = self.app.job(job_id)
        if int(k) >= len(job.results):
            raise HTTPError(404, f"result {k} of this request is not ready")
        self.send(200, job.results[int(k)], "image/png")

    def api_download(self, query):
        params = {key: values[0] for key, values in parse_qs(query).items()}
        data, name = self.app.download(params)
        self.send(200, data, "image/png", {"Content-Disposition": f'attachment; filename="{name}"'})

    @staticmethod
    def upload_info(upload: Upload) -> dict:
        return {"id": upload.id, "name": upload.name, "width": upload.width, "height": upload.height,
                "preview": f"/api/images/{upload.id}.png", "original": f"/api/images/{upload.id}/original"}

    # Responses ------------------------------------------------------------------------------------------------

    def send_json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(value).encode(), "application/json", headers)

    def send(self, status: int, data: bytes, kind: str, headers: dict | None = None) -> None:
        self.connection.settimeout(self.server.app.limits.client_timeout)  # reads may have shortened it
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; "
                                                    "frame-ancestors 'none'; form-action 'none'")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


REQUEST_TIME = 4  # a request must arrive within this many client timeouts


class _Deadline(io.RawIOBase):
    """A connection's incoming bytes, each read limited to the idle timeout and to what is left of the request's
    time, so that a client sending a byte now and then cannot hold a thread."""

    def __init__(self, sock, idle: float):
        self.sock, self.idle, self.deadline = sock, idle, float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.sock.settimeout(min(self.idle, left))
        return self.sock.recv_into(buffer)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections the kernel holds until accepted (the default 5 resets bursts)

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False):
        super().__init__((host, port), Handler)
        self.app, self.verbose = app, verbose
        self.local_only = _is_loopback(host)
        web = resources.files("chimle").joinpath("web")
        self.files = {name: web.joinpath(name).read_bytes() for name, _ in STATIC.values()}
        self.most_connections = min(app.limits.connections, _descriptor_limit() // 2)
        self.connections = 0  # connections being served (each in its thread)
        self.connections_lock = threading.Lock()

    def get_request(self):
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)  # out of descriptors: wait for some to close rather than spin on the pending connection
            raise

    def process_request(self, request, client_address) -> None:
        """Serve a connection in its thread, or, beyond the cap on connections, answer 503 at once and close it."""
        with self.connections_lock:
            busy = self.connections >= self.most_connections
            if not busy:
                self.connections += 1
        if busy:
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self.connections_lock:
            self.connections -= 1

    def _refuse(self, request) -> None:
        body = json.dumps({"error": "the server has too many open connections; try again in a moment"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 5\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)  # never wait on a client here: this is the thread that accepts
            request.send(head + body)
            request.recv(65536)  # what the client already sent, so that closing sends no reset
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A client that went away or was too slow is no error of the server's; anything else is reported."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"


def _descriptor_limit() -> int:
    """How many files and sockets this process may have open (a large number where that cannot be read)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 2**20
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 2**20


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def served_models(args) -> dict[str, Model]:
    """The models of `chimle serve` by name: those of --model, or without it every built-in model."""
    paths = args.model or [builtin.PREFIX + name for name in builtin.names()]
    if not paths:
        raise ConfigError("this version of chimle has no built-in models to serve: give --model RUN (a run directory "
                          "or model file)")
    models = {}
    for name, path in zip(model_names(paths), paths):
        models[name] = Model.load(path, args.device, args.tile, args.overlap, args.tile_stats)
        print(f"model {name}: {models[name].config.task}, {models[name].levels} levels ({path})")
    return models


def serve_command(args) -> None:
    """`chimle serve`: load the models, then serve the page until interrupted (Ctrl+C or SIGTERM); the uploads'
    temporary folder is removed however it stops."""
    models = served_models(args)
    limits = Limits(upload_bytes=int(args.max_upload_mb * 2**20), input_pixels=args.max_pixels,
                    output_pixels=args.max_output_pixels, client_timeout=args.client_timeout)
    app = App(models, limits)
    try:
        try:
            server = Server(app, args.host, args.port, verbose=True)
        except (OSError, OverflowError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ConfigError(f"cannot listen on {args.host}:{args.port} ({reason}); give another --port (0 picks a "
                              "free one)") from None
        if not server.local_only:
            print(f"warning: listening on {args.host}: anyone who can reach this address can use the page",
                  file=sys.stderr)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)
        print(f"chimle serve: open {server.url}  (Ctrl+C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            server.server_close()
    finally:
        app.close()


def _interrupt(signum, frame) -> None:
    """SIGTERM (kill, a service manager stopping the server) stops it as Ctrl+C does."""
    raise KeyboardInterrupt
