"""Apps for `tether run` tests, as a user would write them: a server on `$PORT`, and a
client that calls a service by name through `HTTP_PROXY` and exits with a given code.

    python -m tests.run_app server            # GET / -> {"replica": ..., "pid": ...};
                                              # after GET /sick, /health answers 503
    python -m tests.run_app client URL CODE   # exit CODE if URL answered 200, else 1
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    sick = False  # after GET /sick, /health answers 503 (a hung or broken app)

    def do_GET(self) -> None:
        if self.path == "/sick":
            Handler.sick = True
        if self.path == "/health" and Handler.sick:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps(
            {"replica": os.environ.get("TETHER_REPLICA"), "pid": os.getpid(), "path": self.path}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def server() -> int:
    httpd = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    httpd.daemon_threads = True

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"serving on {os.environ['PORT']}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


def client(url: str, code: int) -> int:
    # urllib takes HTTP_PROXY from the environment, as most HTTP clients do.
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
        print(f"{url} answered {resp.status}: {body}", flush=True)
        return code if resp.status == 200 and "pid" in body else 1


if __name__ == "__main__":
    if sys.argv[1] == "server":
        raise SystemExit(server())
    raise SystemExit(client(sys.argv[2], int(sys.argv[3])))
