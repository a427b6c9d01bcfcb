"""Shared test helpers: random adapters, a live server process on a free loopback port, dropped streams."""

from __future__ import annotations

import collections
import math
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import torch

import remix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, args: list[str], env: dict | None = None, verify=None, log_level: str = "warning"):
        """``verify``: an ssl.SSLContext trusting the server's certificate, for a server started with --ssl-* flags
        (its URL is then https)."""
        self.port = free_port()
        self.verify = verify if verify is not None else True
        self.url = f"{'https' if verify is not None else 'http'}://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "--base", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", "1", "--log-level", log_level] + args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        # its output read as it comes (the last lines kept): a server writing to a pipe nobody reads blocks once the
        # pipe's 64 KB are full, and its HTTP thread then hangs in the middle of a log line
        self.lines: collections.deque = collections.deque(maxlen=2000)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(10)
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not come up")

    def output(self) -> str:
        """What the server has written (its last 2,000 lines)."""
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


def write_adapter(model, path, seed: int, n: int = 4, k: int = 2, r: int = 4) -> str:
    """A ReMix adapter with random (non-zero) pools and routers on ``model``, saved to ``path``; model unwrapped after.
    Every tensor comes from ``seed`` (A too, which inject draws from the global generator): the same adapter whatever
    ran before (a bfloat16 near-tie in one test had followed the order the tests ran in)."""
    layers = remix.inject(model, remix.MixtureConfig(n=n, k=k, r=r))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5))'s bound, as inject draws A
            layer.lora_A.copy_((torch.rand(layer.lora_A.shape, generator=g) * 2 - 1) * bound)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
            layer.router.copy_(torch.randn(layer.router.shape, generator=g))
    remix.save_adapter(model, path)
    remix.unwrap(model)
    return str(path)


def serve_together(engine, requests) -> dict[str, list]:
    """Submit every request to ``engine`` at once and step it until idle; each request's events by its id."""
    events = {r.request_id: [] for r in requests}
    for r in requests:
        engine.submit(r, events[r.request_id].append)
    while engine.has_work():
        engine.step()
    return events


def drop_streams(url: str, count: int, body_of, headers: dict | None = None, keep_lines=lambda i: 2,
                 path: str = "/v1/completions") -> None:
    """Open ``count`` streaming requests to ``path`` at once and hang up on each after a few lines."""
    import threading

    def one(i: int) -> None:
        try:
            with httpx.stream("POST", url + path, json=body_of(i), headers=headers or {}, timeout=60) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= keep_lines(i):
                        break
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    """/health once nothing runs, waits or holds cache (or the last reading at the deadline)."""
    deadline = time.time() + timeout
    while True:
        h = httpx.get(url + "/health").json()
        if (h["running"], h["waiting"], h["slots_used"]) == (0, 0, 0) or time.time() > deadline:
            return h
        time.sleep(0.2)
