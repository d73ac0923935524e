"""Local servers on loopback (Redis, Prometheus, the BentoML service) for tests, benchmarks and demos."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now; a server may still lose it to a race, so callers retry on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ready(
    proc: subprocess.Popen[bytes], url: str, timeout_s: float, interval_s: float = 0.1
) -> bool:
    """Poll ``url`` until it answers 200; False if ``proc`` exited first (e.g. the port was taken) or time ran out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    return False


def stop(proc: subprocess.Popen[bytes], timeout_s: float, *, group: bool = False) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within ``timeout_s``; always reaps it.

    ``group``: signal the process group the server leads (started with ``start_new_session``), so its workers stop
    too, even if the leader has already exited.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
