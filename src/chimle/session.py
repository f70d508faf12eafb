"""The web page's model session: the models it serves, the inputs people gave, and their requests queued for
the models, with the limits that keep a server up under load. chimle.serve turns HTTP requests into these calls;
an error a person can fix is an HTTPError with its status, or one of USER_ERRORS.

Uploads live under random ids in a private temporary folder (removed by `close`); one lock serialises every use
of the models; a full queue (requests, and downloads that render) is refused rather than piling up; finished
results are kept up to a number of bytes, the oldest requests forgotten first.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import shutil
import tempfile
import threading
import traceback
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from PIL import Image, UnidentifiedImageError

from chimle.checkpoint import CheckpointError
from chimle.config import ConfigError
from chimle.data import DataError, builtin_photos, center_crop, list_images, load_image, read_image
from chimle.sample import (Model, format_sources, kept_levels, parse_sources, png_bytes, provenance, sources_tag,
                           variations)
from chimle.tasks import TaskError, downsample

USER_ERRORS = (DataError, TaskError, ConfigError, CheckpointError)
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF", "PPM": "PPM/PGM"}


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
