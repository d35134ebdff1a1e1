"""A real S3 endpoint for the tests (moto's server, its own process) and a fault-injecting
HTTP proxy to put in front of it.

The proxy speaks just enough HTTP/1.1 (keep-alive, Content-Length and chunked bodies,
``Expect: 100-continue``) to sit between boto3 and moto, and fails a chosen fraction of
requests the ways networks and object stores do: a 503 SlowDown, a reset before the
request reaches the server, a reset after the server applied it (the client never learns
it succeeded), a response cut off mid-body, or a stall past the client's read timeout.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import BinaryIO

FAULTS = ("slowdown", "reset_before", "reset_after", "cut_body", "stall")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on a free local port, for the whole test session."""

    def __init__(self) -> None:
        self.port = free_port()
        # Its log goes to a file: a pipe nobody reads fills up and blocks the server.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"moto server exited: {self.log.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start within 30 s")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class FaultProxy:
    """Forward HTTP to ``upstream_port``, failing ``rate`` of requests (seeded)."""

    def __init__(self, upstream_port: int, rate: float, seed: int = 1, stall_s: float = 3.0,
                 faults: tuple[str, ...] = FAULTS) -> None:
        self.upstream_port, self.rate, self.stall_s, self.faults = upstream_port, rate, stall_s, faults
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fate(self) -> str | None:
        with self._lock:
            if self._random.random() >= self.rate:
                self.forwarded += 1
                return None
            fault = self._random.choice(self.faults)
            self.injected[fault] += 1
            return fault

    def _serve(self, client: socket.socket) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        reader = client.makefile("rb")
        try:
            while True:
                request = _read_request(reader, client)
                if request is None:
                    return
                method, path, headers, body = request
                fate = self._fate()
                if fate == "slowdown":
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
                    continue
                if fate == "reset_before":
                    return _reset(client)
                if fate == "stall":
                    time.sleep(self.stall_s)
                    return _reset(client)
                upstream.request(method, path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                if fate == "cut_body" and len(data) < 2:  # nothing to cut: drop the answer instead
                    with self._lock:
                        self.injected["cut_body"] -= 1
                        self.injected["reset_after"] += 1
                    fate = "reset_after"
                if fate == "reset_after":
                    return _reset(client)
                head = [f"HTTP/1.1 {response.status} {response.reason}".encode()]
                head += [f"{k}: {v}".encode() for k, v in response.getheaders()
                         if k.lower() not in ("transfer-encoding", "content-length", "connection")]
                head.append(b"Content-Length: %d" % len(data))
                client.sendall(b"\r\n".join(head) + b"\r\n\r\n")
                if fate == "cut_body":
                    client.sendall(data[:len(data) // 2])
                    return _reset(client)
                client.sendall(data)
        except OSError:
            return
        finally:
            upstream.close()
            reader.close()
            client.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a dropped connection looks to the client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_request(reader: BinaryIO, client: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    line = reader.readline()
    if not line.strip():
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        header = reader.readline().decode("latin-1")
        if header in ("\r\n", "\n", ""):
            break
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    lowered = {k.lower(): k for k in headers}
    if headers.get(lowered.get("expect", ""), "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        del headers[lowered["expect"]]
    if headers.get(lowered.get("transfer-encoding", ""), "").lower() == "chunked":
        del headers[lowered["transfer-encoding"]]
        pieces = []
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                reader.readline()
                break
            pieces.append(reader.read(size))
            reader.readline()
        body = b"".join(pieces)
        headers["Content-Length"] = str(len(body))
    else:
        body = reader.read(int(headers.get(lowered.get("content-length", ""), "0") or 0))
    return method, path, headers, body
