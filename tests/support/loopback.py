"""What the tests' loopback servers share: a threaded HTTP server on 127.0.0.1 and basic auth."""

from __future__ import annotations

import base64
import http.server
import threading


class LoopbackServer:
    """Mixin for the fake mirrors: `_serve(Handler)` starts, `port`, `auth_url` and `stop()`."""

    username: str | None
    password: str | None

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def auth_url(self, path: str) -> str:
        auth = f"{self.username}:{self.password}@" if self.username else ""
        return f"http://{auth}127.0.0.1:{self.port}/{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def authorized(self, handler: http.server.BaseHTTPRequestHandler) -> bool:
        """True when no password is set or the request carries it; else answers 401."""
        if not self.username:
            return True
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        if handler.headers.get("Authorization") == f"Basic {expected}":
            return True
        handler.send_response(401)
        handler.send_header("WWW-Authenticate", 'Basic realm="test"')
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return False
