"""`chimle serve` as a separate process on loopback, attacked: slow clients, bursts, hostile requests, clients
that go away, stopping it. Every request loop here is bounded in count and time."""

import json
import signal
import socket
import struct
import tempfile
import threading
import time
import zlib

import pytest

from chimle.cli import main
from live import answer, png, raw, request, save_models, start


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server for 4x super-resolution and decompression at 100 open files (`ulimit -n 100`), whose outputs may
    have 512 x 512 px, and whose clients time out after 2 s of silence."""
    server = start(tmp_path_factory.mktemp("live"), "--client-timeout", "2", "--max-output-pixels", "262144",
                   descriptors=100)
    yield server
    server.stop()


def upload(port: int, data: bytes, name: str = "in.png") -> dict:
    status, _, body = answer(port, "POST", "/api/images", data, {"Content-Type": "image/png", "X-Filename": name})
    assert status == 200, body
    return json.loads(body)


def test_slow_clients_are_cut_off_and_cannot_use_up_the_descriptors(live):
    # 101 connections that never finish their headers, at a limit of 100 open files.
    slow = []
    for _ in range(101):
        s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        s.sendall(b"GET /api/models HTTP/1.1\r\nHost: local")
        slow.append(s)
    try:
        # While they hang on, the server neither spins nor stops answering (a 503 while it is full).
        used = live.cpu_seconds()
        time.sleep(0.8)
        assert live.cpu_seconds() - used < 0.4
        status, headers, _ = answer(live.port, "GET", "/api/models", within=5)
        assert status in (200, 503) and (status == 200 or headers["Retry-After"])
        # After 2 s of silence each of them is closed.
        deadline = time.monotonic() + 8
        for s in slow:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    finally:
        for s in slow:
            s.close()
    assert answer(live.port, "GET", "/api/models", within=5)[0] == 200
    assert "Traceback" not in live.errors()


def test_a_burst_of_connections_waits_in_the_backlog_instead_of_being_reset(live):
    image = upload(live.port, png(8, 8))["id"]
    body = json.dumps({"model": "super-resolution", "image": image, "n": 1}).encode()
    live.process.send_signal(signal.SIGSTOP)  # the server accepts nothing for a moment
    connected, answers = [], []
    try:
        def connect():
            try:
                connected.append(socket.create_connection(("127.0.0.1", live.port), timeout=2))
            except OSError:
                pass

        threads = [threading.Thread(target=connect) for _ in range(50)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        live.process.send_signal(signal.SIGCONT)
    assert len(connected) == 50  # the default backlog of 5 lets 6 in

    def post(s):
        try:
            s.settimeout(20)
            s.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            answers.append(s.recv(64).split(b" ")[1])
        except OSError as error:
            answers.append(repr(error).encode())
        finally:
            s.close()

    threads = [threading.Thread(target=post, args=(s,)) for s in connected]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert set(answers) <= {b"202", b"503"} and b"202" in answers, answers


def test_hostile_requests_get_an_answer_and_no_traceback(live):
    port = live.port
    # A 109 KB file that decodes to 30000 x 30000 px: refused from its header.
    bomb = _one_bit_png(30_000, 30_000)
    status, _, body = request(port, "POST", "/api/images", bomb, {"Content-Type": "image/png"})
    assert status == 413 and b"implausibly large" in body
    # A 1x1 image: taken, but no model renders it.
    tiny = upload(port, png(1, 1), name="dot.png")["id"]
    status, _, body = request(port, "POST", "/api/jobs", {"model": "super-resolution", "image": tiny})
    assert status == 400 and b"dot.png: an input of 1x1 px is too small" in body
    status, _, body = request(port, "GET", f"/api/download?model=super-resolution&image={tiny}&sources=1:1,1:1")
    assert status == 400 and b"too small" in body
    # JSON nested 30,000 deep, numbers of 5,000 digits, in JSON and in sources.
    deep = b"[" * 30_000 + b"]" * 30_000
    status, _, body = request(port, "POST", "/api/jobs", deep, {"Content-Type": "application/json"})
    assert status == 400 and b"not valid JSON" in body
    image = upload(port, png(8, 8))["id"]
    long = "9" * 5000
    for text in ('{"model": "super-resolution", "image": "%s", "n": %s}' % (image, long),
                 '{"model": "super-resolution", "image": "%s", "seed": %s}' % (image, long[:4000])):
        status, _, body = request(port, "POST", "/api/jobs", text.encode(), {"Content-Type": "application/json"})
        assert status == 400, body
    status, _, body = request(port, "GET", f"/api/download?model=super-resolution&image={image}&sources={long}:1,1:1")
    assert status == 400 and b"below 10**18" in body
    # A Content-Length that is a digit to Python but no number.
    answer_ = raw(port, "POST /api/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        "Content-Length: \u00b2\r\n\r\n{}".encode())
    assert answer_.startswith(b"HTTP/1.0 411")
    # A method a route does not take: 405 with the methods it does.
    status, headers, body = request(port, "POST", "/api/models", b"{}", {"Content-Type": "application/json"})
    assert status == 405 and headers["Allow"] == "GET" and b"use GET" in body
    assert request(port, "DELETE", f"/api/jobs/{'0' * 16}")[0] == 405
    assert request(port, "HEAD", "/")[0] == 405
    # The size to downscale to, for an input one pixel too wide for 512 x 512 px outputs, is 128 x 128.
    wide = upload(port, png(129, 128))["id"]
    status, _, body = request(port, "POST", "/api/jobs", {"model": "super-resolution", "image": wide})
    assert status == 400 and b"downscale the input to at most 128x128 px" in body
    assert "Traceback" not in live.errors()


def _one_bit_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG: tiny on disk, width x height pixels once decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    rows = zlib.compressobj(9)
    data = b"".join(rows.compress(row) for _ in range(height)) + rows.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_clients_that_go_away_mid_answer_leave_no_traceback(live):
    result = upload(live.port, png(64, 64))
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        path = "/" if i % 2 else result["original"]
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        s.close()
    assert answer(live.port, "GET", "/api/models")[0] == 200
    time.sleep(0.3)
    errors = live.errors()
    assert "Traceback" not in errors and "BrokenPipe" not in errors and "ConnectionReset" not in errors


def test_bad_starts_leave_nothing_behind(tmp_path, monkeypatch, capsys):
    """A port that cannot be, a port in use, limits out of range: one line, no traceback, no temporary folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    models = [a for run in save_models(tmp_path / "models") for a in ("--model", str(run))]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for options, message in ((["--port", "99999"], "must be a port number in 0..65535"),
                                 (["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1:"),
                                 (["--max-upload-mb", "nan"], "must be a number greater than 0"),
                                 (["--max-upload-mb", "-1"], "must be a number greater than 0"),
                                 (["--client-timeout", "0"], "must be a number greater than 0")):
            try:
                code = main(["serve", "--device", "cpu", *models, *options])
            except SystemExit as stop:  # argparse
                code = stop.code
            err = capsys.readouterr().err
            assert code == 2 and message in err and "Traceback" not in err, options
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_sigterm_stops_the_server_and_removes_the_uploads(live):
    """The last test of the module: it stops the server."""
    upload(live.port, png(8, 8))
    assert [p.name.startswith("chimle-serve-") for p in live.tmp.iterdir()] == [True]
    assert live.stop() == 0  # SIGTERM
    assert not list(live.tmp.iterdir())
    assert "Traceback" not in live.errors()
