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
import hashlib
import io
import ipaddress
import json
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from PIL import Image, UnidentifiedImageError

from chimle import builtin
from chimle.checkpoint import CheckpointError
from chimle.config import ConfigError
from chimle.data import DataError, builtin_photos, center_crop, list_images, load_image, read_image
from chimle.sample import (Model, format_sources, kept_levels, parse_sources, png_bytes, provenance, sources_tag,
                           variations)
from chimle.tasks import TaskError, downsample

USER_ERRORS = (DataError, TaskError, ConfigError, CheckpointError)
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF", "PPM": "PPM/PGM"}
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
LOCAL_NAMES = {"localhost", "127.0.0.1", "[::1]"}
SIMPLE_TYPES = {"text/plain", "multipart/form-data", "application/x-www-form-urlencoded"}  # no CORS preflight
ID = r"([0-9a-f]{16})"


@dataclass
class Limits:
    upload_bytes: int = 20 * 2**20  # largest upload, bytes
    input_pixels: int = 4_000_000  # largest input image, pixels
    output_pixels: int = 2048 * 2048  # largest output image, pixels (untiled, the network's memory grows with it)
    samples: int = 32  # most samples per request
    queue: int = 8  # most requests waiting for or holding the models
    json_bytes: int = 64 * 2**10  # largest JSON request body
    images: int = 64  # inputs kept (the oldest is forgotten)
    jobs: int = 64  # finished requests kept
    result_bytes: int = 512 * 2**20  # PNG bytes of finished results kept (the oldest requests are forgotten)
    connections: int = 64  # open connections served at once; more get a 503 (also at most half the fd limit)
    client_timeout: float = 30.0  # seconds a connection may send nothing; 4x this to send one whole request


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass
class Upload:
    id: str
    name: str  # the file name as given (display and provenance only)
    path: Path  # where the bytes are kept, named by the id
    width: int
    height: int
    sha256: str


@dataclass
class Job:
    id: str
    model: str
    image: str
    seed: int
    sources: list  # per result, its per-level sources
    state: str = "queued"  # queued | running | done | error
    error: str | None = None
    results: list = field(default_factory=list)  # PNG bytes per finished result


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


class App:
    """The models, the inputs people gave and their requests; what the HTTP handler calls."""

    def __init__(self, models: dict[str, Model], limits: Limits | None = None):
        self.models = models
        self.limits = limits or Limits()
        self.model_lock = threading.Lock()  # one render at a time, whatever the number of requests
        self.lock = threading.Lock()  # the bookkeeping below
        self.folder = Path(tempfile.mkdtemp(prefix="chimle-serve-"))
        self.uploads: OrderedDict[str, Upload] = OrderedDict()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.examples = {p.stem: p for p in list_images(builtin_photos("heldout"))}
        self.example_ids: dict[tuple[str, str], str] = {}
        self.result_bytes = 0  # PNG bytes of all results kept
        self.downloads = 0  # downloads rendering now or waiting for the models

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def model(self, name) -> Model:
        if not isinstance(name, str) or name not in self.models:
            raise HTTPError(404, f"unknown model {name!r}; this server has {', '.join(self.models)}")
        return self.models[name]

    def describe(self) -> dict:
        models = []
        for name, m in self.models.items():
            models.append({"name": name, "task": m.config.task, "summary": m.task.summary, "levels": m.levels,
                           "scale": m.task.output_scale(m.levels), "multiple": self._multiple(m),
                           "input": m.task.input_kind, "tile": asdict(m.tiling) if m.tiling else None})
        return {"models": models, "examples": sorted(self.examples), "limits": asdict(self.limits)}

    # Inputs ---------------------------------------------------------------------------------------------------

    def add_image(self, data: bytes, name: str) -> Upload:
        """Check an upload (type, pixels, a full decode) and keep it under a fresh id."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
                with Image.open(io.BytesIO(data)) as image:
                    kind, (width, height) = image.format, image.size
        except Image.DecompressionBombError:
            raise HTTPError(413, f"{name}: the image is implausibly large (decompression-bomb guard); downscale it "
                                 "first") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            kind = None
        if kind not in FORMATS:
            raise HTTPError(415, f"{name}: not an image this page takes; upload a {', '.join(FORMATS.values())} file")
        if width * height > self.limits.input_pixels:
            raise HTTPError(413, f"{name}: {width}x{height} px is more than this server takes "
                                 f"({self.limits.input_pixels:,} pixels); downscale it first")
        upload = Upload(secrets.token_hex(8), name, Path(), 0, 0, hashlib.sha256(data).hexdigest())
        upload.path = self.folder / f"{upload.id}.{kind.lower()}"
        upload.path.write_bytes(data)
        try:
            upload.height, upload.width = read_image(upload.path).shape[-2:]
        except DataError as error:
            upload.path.unlink(missing_ok=True)
            raise DataError(str(error).replace(str(upload.path), name)) from None
        with self.lock:
            self.uploads[upload.id] = upload
            while len(self.uploads) > self.limits.images:
                _, old = self.uploads.popitem(last=False)
                old.path.unlink(missing_ok=True)
        return upload

    def upload(self, image_id) -> Upload:
        with self.lock:
            if not isinstance(image_id, str) or image_id not in self.uploads:
                raise HTTPError(404, "this image is no longer on the server; upload it again")
            return self.uploads[image_id]

    def example(self, model_name, example) -> Upload:
        """A built-in held-out photo as an input for a model: a centre crop of its training size, downsampled
        for super-resolution (what the model was trained to take)."""
        m = self.model(model_name)
        if not isinstance(example, str) or example not in self.examples:
            raise HTTPError(404, f"unknown example {example!r}")
        if m.task.input_kind != "image":
            raise TaskError(f"the built-in examples are photos, and the {m.config.task} model takes label maps: "
                            "upload a label map in its palette's colours")
        key = (model_name, example)
        if key in self.example_ids and self.example_ids[key] in self.uploads:
            return self.uploads[self.example_ids[key]]
        photo = load_image(self.examples[example])
        step = 2**m.levels
        side = min(m.config.data.crop, *photo.shape[-2:]) // step * step
        image = center_crop(photo, side)
        scale = m.task.output_scale(m.levels)
        if scale > 1:
            image = downsample(image[None], scale)[0]
        upload = self.add_image(png_bytes(image), f"{example}.png")
        self.example_ids[key] = upload.id
        return upload

    @staticmethod
    def _multiple(m: Model) -> int:
        return m.task.input_multiple(m.levels)

    def check_fits(self, m: Model, upload: Upload) -> None:
        """Refuse, with what to do, an input too small for the model, whose sides it cannot halve, or whose output
        is too large."""
        w, h, k = upload.width, upload.height, self._multiple(m)
        problem = m.task.too_small(w, h, m.levels)
        if problem:
            raise TaskError(f"{upload.name}: {problem}; upload a larger image")
        if w % k or h % k:
            fit = f"{max(w // k, 1) * k}x{max(h // k, 1) * k}"
            raise TaskError(f"this model needs sides that are multiples of {k} px, and {upload.name} is {w}x{h}: "
                            f"crop (or pad) it to {fit} px and upload it again")
        s = m.task.output_scale(m.levels)
        if w * h * s * s > self.limits.output_pixels:
            fw, fh = fitting_size(w, h, k, s, self.limits.output_pixels)
            raise TaskError(f"this model makes images {s}x larger, so {w}x{h} px would give {w * s}x{h * s} px, more "
                            f"than this server renders ({self.limits.output_pixels:,} pixels): downscale the input "
                            f"to at most {fw}x{fh} px")

    # Requests -------------------------------------------------------------------------------------------------

    def submit(self, request: dict) -> Job:
        """Queue n samples of an input, or n variations of a chosen image (base + kept levels)."""
        m, upload = self.model(request.get("model")), self.upload(request.get("image"))
        self.check_fits(m, upload)
        n = _integer(request.get("n", min(8, self.limits.samples)), "n")
        if not 1 <= n <= self.limits.samples:
            raise HTTPError(400, f"ask for 1 to {self.limits.samples} samples, not {n}")
        seed = request.get("seed")
        seed = secrets.randbelow(10_000) if seed in (None, "") else _integer(seed, "seed")
        if seed < 0:
            raise HTTPError(400, f"the seed must be 0 or more, not {seed}")
        if request.get("base"):
            base = parse_sources(str(request["base"]), m.levels)
            if not isinstance(request.get("keep", []), list):
                raise HTTPError(400, "keep must be a list of the levels to keep, e.g. [0, 1]")
            try:
                keep = kept_levels([_integer(level, "keep") for level in request.get("keep", [])], m.levels)
            except (ValueError, TypeError) as error:
                raise HTTPError(400, str(error)) from None
            sources = variations(base, keep, seed, n)
        else:
            sources = variations([(seed, 0)] * m.levels, set(), seed, n)
        job = Job(secrets.token_hex(8), request["model"], upload.id, seed, sources)
        with self.lock:
            self._admit()
            self.jobs[job.id] = job
            finished = [j.id for j in self.jobs.values() if j.state in ("done", "error")]
            for old in finished[: max(0, len(self.jobs) - self.limits.jobs)]:
                self._forget(old)
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job

    def _admit(self) -> None:
        """Refuse a request that would render while the queue is full (call with self.lock held)."""
        waiting = sum(j.state in ("queued", "running") for j in self.jobs.values()) + self.downloads
        if waiting >= self.limits.queue:
            raise HTTPError(503, f"the server is busy with {waiting} requests; try again in a moment",
                            {"Retry-After": "5"})

    def _forget(self, job_id: str) -> None:
        """Drop a finished request and its results (call with self.lock held)."""
        job = self.jobs.pop(job_id)
        self.result_bytes -= sum(len(r) for r in job.results)

    def _keep(self, job: Job, result: bytes) -> None:
        """Add a result, then forget the oldest finished requests while the results take more than the limit."""
        with self.lock:
            job.results.append(result)
            self.result_bytes += len(result)
            for old in [j.id for j in self.jobs.values() if j.state in ("done", "error") and j is not job]:
                if self.result_bytes <= self.limits.result_bytes:
                    break
                self._forget(old)

    def _run(self, job: Job) -> None:
        m, upload = self.models[job.model], self.uploads.get(job.image)
        with self.model_lock:
            job.state = "running"
            try:
                if upload is None:
                    raise DataError("the image was forgotten before its turn came; upload it again")
                image = m.load_input(upload.path)
                for sources in job.sources:
                    self._keep(job, png_bytes(m.render(image, [sources])[0], provenance(m, sources, upload.name)))
                job.state = "done"
            except USER_ERRORS as error:
                message = str(error)
                job.error, job.state = message.replace(str(upload.path), upload.name) if upload else message, "error"
            except Exception as error:  # noqa: BLE001 - the page shows it; the console keeps the traceback
                traceback.print_exc()
                job.error, job.state = f"internal error: {error.__class__.__name__}: {error}", "error"

    def job(self, job_id) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise HTTPError(404, "this request is no longer on the server; sample again")
            return self.jobs[job_id]

    def status(self, job: Job) -> dict:
        results = [{"index": k, "sources": format_sources(s), "url": f"/api/jobs/{job.id}/{k}.png",
                    "download": self.download_url(job.model, job.image, s),
                    "command": provenance(self.models[job.model], s, self.uploads[job.image].name)["command"]
                    if job.image in self.uploads else None}
                   for k, s in enumerate(job.sources[: len(job.results)])]
        return {"id": job.id, "state": job.state, "done": len(job.results), "total": len(job.sources),
                "seed": job.seed, "error": job.error, "results": results}

    @staticmethod
    def download_url(model: str, image: str, sources) -> str:
        return "/api/download?" + urlencode({"model": model, "image": image, "sources": format_sources(sources)})

    def download(self, query: dict) -> tuple[bytes, str]:
        """The PNG of the image some sources name (from a finished request, else rendered now), and its name."""
        m, upload = self.model(query.get("model")), self.upload(query.get("image"))
        sources = parse_sources(query.get("sources", ""), m.levels)
        name = f"{Path(upload.name).stem}_{sources_tag(sources)}.png"
        with self.lock:
            for job in reversed(self.jobs.values()):
                if job.model == query["model"] and job.image == upload.id and sources in job.sources:
                    k = job.sources.index(sources)
                    if k < len(job.results):
                        return job.results[k], name
        self.check_fits(m, upload)
        with self.lock:
            self._admit()  # a download that renders waits for the models like a request
            self.downloads += 1
        try:
            with self.model_lock:
                image = m.render(m.load_input(upload.path), [sources])[0]
        finally:
            with self.lock:
                self.downloads -= 1
        return png_bytes(image, provenance(m, sources, upload.name)), name


def fitting_size(width: int, height: int, multiple: int, scale: int, limit: int) -> tuple[int, int]:
    """The largest input size within width x height, of about its aspect ratio and with sides that are multiples
    of `multiple`, whose output (`scale` x larger) has at most `limit` pixels."""
    def fits(w: int, h: int) -> bool:
        return w * h * scale * scale <= limit

    shrink = min(1.0, (limit / (width * height * scale * scale)) ** 0.5)
    w = max(multiple, int(width * shrink) // multiple * multiple)
    h = max(multiple, int(height * shrink) // multiple * multiple)
    while not fits(w, h) and max(w, h) > multiple:  # float rounding
        w, h = (w - multiple, h) if w >= h else (w, h - multiple)
    while True:  # then grow a side while the output still fits (the rounding down above may leave room)
        grown = [(a, b) for a, b in ((w + multiple, h), (w, h + multiple)) if a <= width and b <= height and fits(a, b)]
        if not grown:
            return w, h
        w, h = max(grown, key=lambda size: (size[0] * size[1], -abs(size[0] / size[1] - width / height)))


def _integer(value, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**18:
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):
        return int(value)
    try:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    except ValueError:  # an integer too long to print
        shown = "a number that long"
    raise HTTPError(400, f"{what} must be a whole number below 10**18, not {shown}")


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
