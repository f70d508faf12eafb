"""A real `chimle serve` process on loopback for the tests that attack it, and raw HTTP helpers."""

from __future__ import annotations

import http.client
import io
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from chimle.checkpoint import save_model
from chimle.generator import Generator
from conftest import randomize, tiny_config


def save_models(folder: Path) -> list[Path]:
    """Tiny random models of super-resolution (4x) and decompression, as run directories."""
    runs = []
    for task in ("super-resolution", "decompression"):
        config = tiny_config(task)
        save_model(folder / task / "model.safetensors", randomize(Generator(config.model), seed=4), config)
        runs.append(folder / task)
    return runs


@dataclass
class Live:
    process: subprocess.Popen
    port: int
    stderr: Path
    tmp: Path  # the server's TMPDIR

    def errors(self) -> str:
        return self.stderr.read_text()

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start(folder: Path, *options: str, descriptors: int | None = None, wait: bool = True) -> Live:
    """`python -m chimle serve --port 0` of the models under `folder` (made if missing), its temporary folder and
    stderr kept in `folder`; with `descriptors`, under that limit of open files (as `ulimit -n`)."""
    runs = [folder / "models" / task for task in ("super-resolution", "decompression")]
    if not all((run / "model.safetensors").is_file() for run in runs):
        runs = save_models(folder / "models")
    tmp, stderr = folder / "tmp", folder / "stderr.txt"
    tmp.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "chimle", "serve", "--port", "0", "--device", "cpu",
               *[a for run in runs for a in ("--model", str(run))], *options]
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def limit():
        if descriptors:
            resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True, env=env,
                               preexec_fn=limit)
    live = Live(process, 0, stderr, tmp)
    if wait:
        live.port = _port(process, stderr)
    return live


def _port(process: subprocess.Popen, stderr: Path, timeout: float = 120) -> int:
    found: list[int] = []

    def read():
        for line in process.stdout:
            if "open http://127.0.0.1:" in line:
                found.append(int(line.split("127.0.0.1:")[1].split("/")[0]))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        process.kill()
        raise RuntimeError(f"chimle serve did not start:\n{stderr.read_text()[-3000:]}")
    threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()  # keep its pipe from filling
    return found[0]


def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 30):
    """(status, headers, body bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


def answer(port: int, method: str, path: str, body=None, headers=None, within: float = 10):
    """`request`, tried again while the connection is refused or reset, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return request(port, method, path, body, headers, timeout=max(0.5, deadline - time.monotonic()))
        except (ConnectionError, socket.timeout, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are and return everything the server answers until it closes the connection."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before reading it all
            pass
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    array = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)).mul(255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()
