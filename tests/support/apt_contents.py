"""A loopback apt mirror that serves one suite's Contents index (and answers 404 for anything else)."""

from __future__ import annotations

import http.server

from tests.support.loopback import LoopbackServer


class ContentsMirror(LoopbackServer):
    """Serves `body` (a gzipped Contents index) at /apt-mirror/dists/bookworm/main/Contents-amd64.gz."""

    def __init__(self, body: bytes):
        self.username = self.password = None
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                mirror.requests.append(self.path)
                if self.path != "/apt-mirror/dists/bookworm/main/Contents-amd64.gz":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._serve(Handler)
