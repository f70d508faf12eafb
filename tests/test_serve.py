"""The web page's HTTP side, without a browser: uploads and their limits, jobs, downloads, safety."""

import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from chimle.checkpoint import save_model
from chimle.cli import build_parser
from chimle.generator import Generator
from chimle.sample import Model, png_bytes
from chimle.serve import Server, clean_name, model_names
from chimle.session import App, Limits, fitting_size
import live
from conftest import randomize, tiny_config


def png(width: int, height: int, seed: int = 0) -> bytes:
    array = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)).mul(255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    models = {}
    for task in ("super-resolution", "decompression"):
        config = tiny_config(task)
        save_model(folder / task / "model.safetensors", randomize(Generator(config.model), seed=4), config)
        models[task] = Model.load(folder / task, device="cpu")
    limits = Limits(upload_bytes=4000, input_pixels=600, output_pixels=5000, samples=6, queue=3)
    server = Server(App(models, limits), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    server.app.close()


def request(server, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request, the path sent as it is (no normalisation)."""
    assert server.server_address[0] == "127.0.0.1"
    return live.request(server.server_address[1], method, path, body, headers)


def api(server, method, path, body=None, headers=None, status=200):
    code, _, data = request(server, method, path, body, headers)
    assert code == status, data
    return json.loads(data)


def upload(server, data: bytes, name="photo.png", kind="image/png", status=200):
    return api(server, "POST", "/api/images", data, {"Content-Type": kind, "X-Filename": name}, status)


def wait(server, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = api(server, "GET", f"/api/jobs/{job_id}")
        if status["state"] in ("done", "error"):
            return status
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_page_and_scripts_are_served_and_nothing_else(server):
    code, headers, page = request(server, "GET", "/")
    assert code == 200 and b'<script src="/app.js"' in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert request(server, "GET", "/app.js")[0] == 200 and request(server, "GET", "/style.css")[0] == 200
    for path in ("/../serve.py", "/%2e%2e/serve.py", "/web/../serve.py", "/app.js/../../sample.py",
                 "/api/images/..%2f..%2fetc%2fpasswd", "/api/jobs/../../etc/passwd", "//etc/passwd", "/index.html"):
        code, _, body = request(server, "GET", path)
        assert code == 404 and b"nothing at" in body, path
    code, _, body = request(server, "GET", "/api/models", headers={"Host": "attacker.example:8000"})
    assert code == 403 and b"localhost only" in body


def test_uploads_are_checked_for_size_type_and_content(server):
    info = upload(server, png(6, 7), name="../../etc/my%20photo.png")
    assert (info["width"], info["height"]) == (6, 7) and info["name"] == "my photo.png"
    assert request(server, "GET", info["preview"])[2].startswith(b"\x89PNG")
    assert request(server, "GET", info["original"])[2] == png(6, 7)
    assert "not an image this page takes" in upload(server, b"<svg></svg>", kind="image/svg+xml", status=415)["error"]
    assert "raw request body" in upload(server, png(6, 7), kind="text/plain", status=415)["error"]
    too_many_bytes = upload(server, png(40, 40), status=413)["error"]
    assert "this server takes up to" in too_many_bytes and "downscale or compress" in too_many_bytes
    big = io.BytesIO()
    Image.new("RGB", (30, 30)).save(big, format="PNG")  # small file, too many pixels
    message = upload(server, big.getvalue(), status=413)["error"]
    assert "30x30 px is more than this server takes (600 pixels); downscale it first" in message
    truncated = upload(server, png(8, 8)[:-30], name="cut.png", status=400)["error"]
    assert truncated.startswith("cut.png:") and "chimle-serve" not in truncated  # no server paths in messages


def test_sample_vary_and_download_are_reproducible(server, tmp_path):
    image = upload(server, png(5, 6, seed=1), name="in.png")
    job = api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image["id"], "n": 3, "seed": 11},
              status=202)
    status = wait(server, job["id"])
    assert status["state"] == "done" and [r["sources"] for r in status["results"]] == ["11:0,11:0", "11:1,11:1",
                                                                                          "11:2,11:2"]
    first = request(server, "GET", status["results"][1]["url"])[2]
    assert Image.open(io.BytesIO(first)).size == (20, 24)

    variation = api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image["id"], "n": 2,
                                                  "seed": 4, "base": "11:1,11:1", "keep": [1]}, status=202)
    status = wait(server, variation["id"])
    assert [r["sources"] for r in status["results"]] == ["4:0,11:1", "4:1,11:1"]
    chosen = status["results"][1]
    assert chosen["command"].startswith("chimle sample --model ") and "--sources 4:1,11:1" in chosen["command"]

    code, headers, data = request(server, "GET", chosen["download"])
    assert code == 200 and headers["Content-Disposition"] == 'attachment; filename="in_4-1_11-1.png"'
    record = json.loads(Image.open(io.BytesIO(data)).text["chimle"])
    assert record["sources"] == "4:1,11:1" and record["input"] == "in.png"
    (tmp_path / "in.png").write_bytes(png(5, 6, seed=1))
    model = server.app.models["super-resolution"]
    expected = model.render(tmp_path / "in.png", [[(4, 1), (11, 1)]])[0]
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(png_bytes(expected)))))
    # Sources no request drew are rendered on demand, the same way.
    fresh = request(server, "GET", chosen["download"].replace("4%3A1", "8%3A3"))[2]
    assert json.loads(Image.open(io.BytesIO(fresh)).text["chimle"])["sources"] == "8:3,11:1"


def test_inputs_the_model_cannot_take_get_a_message_saying_what_to_do(server):
    odd = upload(server, png(9, 12))
    message = api(server, "POST", "/api/jobs", {"model": "decompression", "image": odd["id"], "n": 1}, status=400)
    assert "multiples of 2 px" in message["error"] and "crop (or pad) it to 8x12 px" in message["error"]
    large = upload(server, png(20, 25))
    message = api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": large["id"], "n": 1}, status=400)
    assert "makes images 4x larger" in message["error"] and "downscale the input to at most" in message["error"]
    fits = upload(server, png(8, 12))["id"]
    for body, expected in (({"model": "nope", "image": fits}, "unknown model"),
                           ({"model": "decompression", "image": "0" * 16}, "upload it again"),
                           ({"model": "decompression", "image": fits, "n": 99}, "1 to 6 samples"),
                           ({"model": "decompression", "image": fits, "seed": "x"}, "whole number"),
                           ({"model": "decompression", "image": fits, "base": "1:1"}, "the model has 2"),
                           ({"model": "decompression", "image": fits, "base": "1:1,1:1", "keep": [5]}, "0..1"),
                           ({"model": ["x"], "image": {"y": 1}}, "unknown model"),
                           ({"model": "decompression", "image": fits, "base": "1:1,1:1", "keep": "0"}, "a list")):
        assert expected in request(server, "POST", "/api/jobs", body)[2].decode()
    code, _, data = request(server, "POST", "/api/jobs", b"{}", {"Content-Type": "text/plain"})
    assert code == 415 and b"application/json" in data  # a cross-site form cannot post JSON


def test_examples_are_prepared_for_the_model(server):
    models = api(server, "GET", "/api/models")
    assert [m["name"] for m in models["models"]] == ["super-resolution", "decompression"] and models["examples"]
    example = api(server, "POST", "/api/examples", {"model": "super-resolution", "example": models["examples"][0]})
    assert (example["width"], example["height"]) == (4, 4)  # the 16 px training crop, downsampled x4
    assert api(server, "POST", "/api/examples", {"model": "decompression", "example": "../x"}, status=404)


def test_requests_are_serialised_around_the_models_and_a_full_queue_is_refused(server):
    model = server.app.models["super-resolution"]
    render, active, most = model.render, [0], [0]

    def counting(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.02)
        try:
            return render(*args, **kwargs)
        finally:
            active[0] -= 1

    model.render = counting
    image = upload(server, png(4, 4))
    try:
        with server.app.model_lock:  # hold the models, so that requests queue up
            jobs = [api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image["id"], "n": 2},
                        status=202) for _ in range(3)]
            assert api(server, "GET", f"/api/jobs/{jobs[0]['id']}")["state"] == "queued"
            busy = api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image["id"]}, status=503)
            assert "busy" in busy["error"]
        assert all(wait(server, job["id"])["state"] == "done" for job in jobs)
    finally:
        del model.render
    assert most[0] == 1


def test_names_and_defaults():
    assert model_names(["runs/sr", "runs/sr/model.safetensors", "x/night.safetensors"]) == ["sr", "sr-2", "night"]
    assert clean_name("..%2F..%2Fa%3Cb%3E.png") == "a_b_.png" and clean_name("") == "upload"
    args = build_parser().parse_args(["serve", "--model", "runs/a", "--model", "runs/b"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.model == ["runs/a", "runs/b"]


def test_downloads_that_render_count_against_the_queue(server):
    image = upload(server, png(4, 4))["id"]
    answers = []

    def download(k):
        query = f"/api/download?model=super-resolution&image={image}&sources={k}:0,{k}:0"
        answers.append(request(server, "GET", query)[0])

    with server.app.model_lock:  # renders wait: each download that must render holds a place in the queue
        threads = [threading.Thread(target=download, args=(100 + k,)) for k in range(6)]
        [t.start() for t in threads]
        deadline = time.time() + 10
        while len(answers) < 3 and time.time() < deadline:  # queue=3: the other three are refused at once
            time.sleep(0.02)
        assert answers == [503, 503, 503]
        busy = api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image}, status=503)
        assert "busy with 3 requests" in busy["error"]
    [t.join() for t in threads]
    assert sorted(answers) == [200, 200, 200, 503, 503, 503] and server.app.downloads == 0


def test_finished_results_are_kept_up_to_a_number_of_bytes(server):
    app, image = server.app, upload(server, png(4, 4))["id"]
    jobs = [api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image, "n": 3, "seed": s},
                status=202)["id"] for s in range(2)]
    assert all(wait(server, job)["state"] == "done" for job in jobs)
    one_job = sum(len(r) for r in app.jobs[jobs[0]].results)
    limit, app.limits.result_bytes = app.limits.result_bytes, int(2.5 * one_job)
    try:
        more = [api(server, "POST", "/api/jobs", {"model": "super-resolution", "image": image, "n": 3, "seed": s},
                    status=202)["id"] for s in range(2, 4)]
        assert all(wait(server, job)["state"] == "done" for job in more)
        assert app.result_bytes == sum(len(r) for j in app.jobs.values() for r in j.results) <= 2.5 * one_job
        assert jobs[0] not in app.jobs and more[-1] in app.jobs  # the oldest went first
        assert "sample again" in api(server, "GET", f"/api/jobs/{jobs[0]}", status=404)["error"]
    finally:
        app.limits.result_bytes = limit


def test_a_client_sending_a_byte_now_and_then_is_cut_off(tmp_path):
    """The idle timeout alone would never end it: the whole request must arrive within 4 timeouts."""
    config = tiny_config("super-resolution")
    save_model(tmp_path / "sr" / "model.safetensors", Generator(config.model), config)
    app = App({"sr": Model.load(tmp_path / "sr", device="cpu")}, Limits(client_timeout=0.3))
    server = Server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with socket.create_connection(server.server_address[:2], timeout=5) as s:
            try:
                for byte in b"GET /api/models HTTP/1.1\r\nHost: localhost\r\n" * 10:
                    s.sendall(bytes([byte]))
                    time.sleep(0.1)
                closed = s.recv(100) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed and time.monotonic() - started < 4 * 0.3 + 1
    finally:
        server.shutdown()
        server.server_close()
        app.close()


def test_the_size_suggested_for_a_too_large_input_fits_and_is_the_largest():
    for width, height, multiple, scale in [(129, 128, 1, 16), (1000, 3, 1, 4), (40, 64, 8, 1), (9, 5000, 1, 2)]:
        limit = 128 * 128 * 16 * 16 // (multiple * scale)
        w, h = fitting_size(width, height, multiple, scale, limit)
        assert w * h * scale * scale <= limit and w % multiple == 0 and h % multiple == 0 and w <= width and h <= height
        assert (w + multiple) * h * scale**2 > limit or w + multiple > width
        assert w * (h + multiple) * scale**2 > limit or h + multiple > height
    assert fitting_size(129, 128, 1, 16, 2048 * 2048) == (128, 128)
