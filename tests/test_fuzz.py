"""Fuzzing for a bounded time: random bytes, HTTP requests, JSON and images at a real `chimle serve`, random YAML
at the config loader. No answer may be a 500, nothing may print a traceback or raise anything but a user error,
the server must answer afterwards, and its memory must stay bounded.

    CHIMLE_FUZZ_SECONDS=120 python -m pytest tests/test_fuzz.py     # longer (default: 3 seconds per target)
"""

import http.client
import io
import json
import os
import random
import socket
import time
from collections import Counter

import yaml
from PIL import Image

from chimle.config import ConfigError, load_run, parse_overrides, resolve
from chimle.data import DataError
from chimle.tasks import TaskError
from live import answer, png, raw, request, start

SECONDS = float(os.environ.get("CHIMLE_FUZZ_SECONDS", "3"))
KEYS = ["model", "image", "n", "seed", "base", "keep", "example", "sources"]
PATHS = ["/", "/app.js", "/api/models", "/api/images", "/api/examples", "/api/jobs", "/api/download",
         "/api/images/0123456789abcdef.png", "/api/images/0123456789abcdef/original", "/api/jobs/0123456789abcdef",
         "/api/jobs/0123456789abcdef/0.png", "/%2e%2e/x", "//", "/api/jobs/" + "9" * 300]


def random_value(rng: random.Random, depth: int = 0):
    """A random JSON-able value: numbers (some huge), strings, booleans, null, lists, objects."""
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.randint(-5, 40)
    if kind == 1:
        return rng.choice([10**30, -(10**19), 2**63, 1e308, -0.0, 0.5])
    if kind == 2:
        return rng.choice(["", "super-resolution", "decompression", "1:1,1:1", "x" * 300, "\u00b2", "../../etc"])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.choice(["0123456789abcdef", "9" * 4000])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS + ["zz"]): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_request(rng: random.Random, images: list[str]) -> tuple:
    """(method, path, body, headers), or (None, None, raw bytes, None) for bytes sent as they are."""
    kind = rng.randrange(7)
    if kind == 0:  # junk on the wire
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        return None, None, rng.choice([b"", b"GET / HTTP/1.1\r\n", b"POST /api/jobs HTTP/1.1\r\n"]) + junk, None
    if kind == 6:  # odd headers and bodies around a well-formed start
        length = rng.choice(["\u00b2", "-1", "99999999999999999999", "1e3", " 2", "", "0x10", "\u0663"])
        body = rng.choice([b"[" * 20_000 + b"]" * 20_000, b'{"n": ' + b"7" * 5000 + b"}", b"{}", b"\xff\xfe"])
        return None, None, (f"POST {rng.choice(['/api/jobs', '/api/images'])} HTTP/1.1\r\nHost: localhost\r\n"
                            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode() + body, None
    if kind in (1, 2):  # JSON requests, mostly well-formed
        body = {k: random_value(rng) for k in rng.sample(KEYS, rng.randrange(len(KEYS)))}
        if rng.random() < 0.5:
            body["image"] = rng.choice(images)
        if rng.random() < 0.5:
            body["model"] = rng.choice(["super-resolution", "decompression"])
        data = json.dumps(body).encode()
        if rng.random() < 0.1:  # a number too long for Python to read
            data = data.replace(b"0", b"1" + b"0" * 4500, 1)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data) + 1)]
        kind_header = rng.choice(["application/json"] * 4 + ["text/plain", "application/json; charset=x"])
        return "POST", rng.choice(["/api/jobs", "/api/examples", "/api/jobs", "/api/models"]), data, \
            {"Content-Type": kind_header}
    if kind == 3:  # uploads: random bytes, or a real image with bytes changed
        data = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randrange(6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        headers = {"Content-Type": rng.choice(["image/png", "image/jpeg", "application/octet-stream", ""]),
                   "X-Filename": rng.choice(["a.png", "../../x", "\u00e9\u00e9.jpg", "%00", "x" * 500])}
        return "POST", "/api/images", bytes(data), headers
    if kind == 4:  # downloads with random queries
        query = "&".join(f"{rng.choice(KEYS)}={rng.choice([rng.choice(images), '1:1,1:1', '9' * 50, '%ff', ''])}"
                         for _ in range(rng.randrange(5)))
        return "GET", f"/api/download?model={rng.choice(['super-resolution', 'x'])}&{query}", None, {}
    method = rng.choice(["GET", "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
    return method, rng.choice(PATHS), b"{}" if method == "POST" else None, {}


def _images() -> list[bytes]:
    seeds = [png(8, 8), png(3, 5, mode="L"), png(16, 16, mode="RGBA"), png(1, 1), png(2, 9)]
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="JPEG", quality=20)
    return [*seeds, buffer.getvalue()]


SEEDS = _images()


def test_fuzz_the_server(tmp_path):
    live = start(tmp_path, "--max-upload-mb", "0.5", "--client-timeout", "2")
    try:
        images = [json.loads(request(live.port, "POST", "/api/images", png(8, 8), {"Content-Type": "image/png"})[2])
                  ["id"]]
        before = live.rss_mib()
        rng, statuses, jobs = random.Random(int(os.environ.get("CHIMLE_FUZZ_SEED", "0"))), Counter(), []
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            method, path, body, headers = random_request(rng, images)
            try:
                if method is None:
                    line = raw(live.port, body, timeout=10).split(b"\r\n", 1)[0]
                    status = int(line.split()[1]) if line.startswith(b"HTTP/") else "closed"
                else:
                    status, _, data = request(live.port, method, path, body, headers, timeout=10)
                    if path == "/api/images" and status == 200:
                        images.append(json.loads(data)["id"])
                    if path == "/api/jobs" and status == 202:
                        jobs.append(json.loads(data)["id"])
            except (ConnectionError, socket.timeout, http.client.HTTPException):
                status = "closed"
            statuses[status] += 1
        assert 500 not in statuses, statuses
        assert sum(statuses.values()) > 10 * SECONDS, statuses  # it did run
        assert answer(live.port, "GET", "/api/models")[0] == 200
        for job in jobs:  # none of the requests it took failed on an error of its own
            state = json.loads(answer(live.port, "GET", f"/api/jobs/{job}")[2])
            assert "internal error" not in str(state.get("error")), state
        assert live.rss_mib() - before < 300, "the server's memory grew by more than 300 MiB"
        assert "Traceback" not in live.errors(), live.errors()[-3000:]
    finally:
        live.stop()


FIELDS = ["task", "preset", "model", "data", "search", "train", "levels", "channels", "lr", "passes", "crop",
          "batch_size", "perceptual", "samples_per_level", "palette", "skip_bad", "bogus"]


def random_yaml(rng: random.Random) -> str:
    """Random YAML: structures of real and unknown setting names with values of every YAML type, or text."""
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(rng.choice("ab: -[]{}&*!|>'\"#%@`,?\n 0123456789.e") for _ in range(rng.randrange(80)))

    def value(depth: int):
        choice = rng.randrange(10 if depth < 3 else 7)
        if choice < 7:
            return rng.choice([0, -3, 3, 2**70, 1.5e-5, "1e-5", "three", "", None, True, "tiny", "layout", "vgg",
                               "nan", ".inf", [8, 8], [1], "2020-01-01", "paper", "x" * 50])
        if choice < 9:
            return {rng.choice(FIELDS): value(depth + 1) for _ in range(rng.randrange(4))}
        return [value(depth + 1) for _ in range(rng.randrange(3))]

    text = yaml.safe_dump({rng.choice(FIELDS): value(0) for _ in range(rng.randrange(5))})
    if kind == 2:  # with YAML's own features
        text += rng.choice(["\nx: &a [1]\ny: *a\n", "\nt: !!python/object:os.system {}\n", "\nd: 2001-12-14\n",
                            "\n" + "[" * 5000 + "]" * 5000 + "\n", "\n\t bad: indent\n"])
    return text


def test_fuzz_the_config_loader(tmp_path):
    rng, outcomes = random.Random(0), Counter()
    path = tmp_path / "config.yaml"
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        text = random_yaml(rng)
        path.write_text(text)
        for load in (lambda: resolve(preset="tiny", file=path), lambda: load_run(path),
                     lambda: resolve(preset="tiny", overrides=[f"train.{rng.choice(FIELDS)}={text[:60]}"]),
                     lambda: parse_overrides([text[:40]])):
            try:
                load()
                outcomes["loaded"] += 1
            except (ConfigError, TaskError, DataError):
                outcomes["refused"] += 1
    assert outcomes["refused"] > 10 and outcomes["loaded"] > 0, outcomes
