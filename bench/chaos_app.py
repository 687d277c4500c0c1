"""An app for the resilience tests, run as its own process so it can be SIGKILLed:

    python -m bench.chaos_app PORT LOG

- `GET /` answers 200 `{"name", "pid"}`, or 500 for a share of requests after
  `GET /control?fail=0.5`, after an extra delay after `GET /control?delay=0.3`;
- `POST /` with an `x-post-id` header appends that id to LOG (one line each, written
  at once, so a SIGKILL loses nothing already answered), then answers like GET;
- `GET /health` 200 (the registry's check); `GET /ready` 200, or 503 after
  `GET /control?ready=0` (a path for the sidecars' active health checks);
- `GET /hits` the number of requests served (health, readiness and control excluded).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class State:
    fail = 0.0
    delay = 0.0
    ready = 1.0
    hits = 0
    lock = threading.Lock()
    log_fd = -1
    rng = random.Random(os.getpid())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes) -> None:
        # Head and body in one write, as most servers send a small response: a response
        # cut between its head and its body by a SIGKILL cannot be retried by anyone.
        reason = b"OK" if status == 200 else b"Error"
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        self.wfile.write(head % (status, reason, len(body)) + body)

    def _serve(self) -> None:
        with State.lock:
            State.hits += 1
            failing = State.rng.random() < State.fail
            delay = State.delay
        if delay:
            time.sleep(delay)
        status = 500 if failing else 200
        self._answer(status, json.dumps({"name": sys.argv[1], "pid": os.getpid()}).encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            self._answer(200, b"{}")
        elif url.path == "/ready":
            self._answer(200 if State.ready else 503, b"{}")
        elif url.path == "/hits":
            self._answer(200, json.dumps({"hits": State.hits}).encode())
        elif url.path == "/control":
            q = parse_qs(url.query)
            with State.lock:
                State.fail = float(q.get("fail", [State.fail])[0])
                State.delay = float(q.get("delay", [State.delay])[0])
                State.ready = float(q.get("ready", [State.ready])[0])
            self._answer(200, b"{}")
        else:
            self._serve()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        rid = self.headers.get("x-post-id", "")
        os.write(State.log_fd, f"{rid}\n".encode())
        self._serve()


def main() -> int:
    port, log = int(sys.argv[1]), sys.argv[2]
    State.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    print(f"serving on {port}", flush=True)
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
