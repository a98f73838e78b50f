"""One compiled program served over HTTP: a Session, its Scheduler (the engine thread),
the metrics and the FastAPI app, under uvicorn.

    server = Server(session, host="127.0.0.1", port=8000, max_waiting=128)
    server.serve()                    # blocks (ttserve)
    server.start(); server.url; server.stop()   # in a thread (tests, benchmarks)

Port 0 picks a free port (`server.port` says which, once started).
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import create_app
from .metrics import Metrics
from .scheduler import Scheduler


def model_id(session) -> str:
    """The name clients give as `model`: the compiled model's name."""
    return str(session.program.model.get("name") or session.path.name)


class Server:
    def __init__(self, session, host: str = "127.0.0.1", port: int = 8000, max_waiting: int = 128):
        if max_waiting < 1:
            raise ValueError(f"--max-waiting must be at least 1, got {max_waiting}")
        self.session = session
        self.scheduler = Scheduler(session, max_waiting=max_waiting)
        self.metrics = Metrics(self.scheduler)
        self.scheduler.listener = self.metrics
        self.model_id = model_id(session)
        self.app = create_app(self.scheduler, session.tokenizer, self.model_id, self.metrics)
        self.host = host
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror})") from None
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C / SIGTERM)."""
        self.scheduler.start()
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.scheduler.stop()
            self._socket.close()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve from a background thread; returns once requests are accepted."""
        self.scheduler.start()  # uvicorn installs signal handlers only in the main thread
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="ttserve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ttserve did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.scheduler.stop()
        self._socket.close()
