"""`mlx serve` as a user starts it: a subprocess on a free 127.0.0.1 port, stopped with Ctrl-C."""

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def running_mlx_serve(mlx: Path, args: list, log: Path, *, env: dict | None = None,
                      timeout: float = 120, poll: float = 0.3):
    """Start ``mlx serve ARGS --port P`` (output in ``log``), wait until /health answers, yield
    its URL; on leaving, Ctrl-C it and check that it stopped cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen([str(mlx), "serve", *map(str, args), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(poll)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) in (0, 130), log.read_text()  # 130: ended by SIGINT, as a shell sees it
