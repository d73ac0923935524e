"""A throwaway redis-server on loopback, for the Redis integration test and `unexrl bench features`.

Started in the foreground as our own child process (no daemon to hunt down later) on a free port, with
persistence off, and stopped by its process id when the context exits.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from unexrl.loopback import free_port, stop

START_TIMEOUT_S = 10.0


def redis_server_path() -> str | None:
    """Where redis-server is installed, or None."""
    return shutil.which("redis-server")


@contextmanager
def local_redis(attempts: int = 3) -> Iterator[str]:
    """Yield ``127.0.0.1:PORT`` of a fresh redis-server; retries on another port if one was taken meanwhile."""
    exe = redis_server_path()
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
    for attempt in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if _wait_ready(proc, port):
                yield f"127.0.0.1:{port}"
                return
        finally:
            stop(proc, 5)
    raise RuntimeError(f"redis-server did not start on a free loopback port in {attempts} attempts")


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> bool:
    """PING until PONG; False if the server exited (port taken) or never answered."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False
