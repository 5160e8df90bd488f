"""Shared pieces of the server tests: a real uvicorn server on a free port, in a thread."""

import socket
import threading
import time

import uvicorn


class LiveServer:
    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):  # what Ctrl-C does in `mlx serve` (server.run_server)
        self.server.config.app.state.engine.abort_all()
        self.server.should_exit = True
        self.thread.join(10)
