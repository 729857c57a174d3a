"""An HTTP server on a free port of 127.0.0.1, serving from a daemon thread until stopped: the
listener of each local stand-in for a Google service (`tokenservice`, `frontend`)."""

from __future__ import annotations

import http.server
import threading


class LocalServer:
    """`handler_class` serving on 127.0.0.1:`port`, one daemon thread per connection (so a
    request that hangs never blocks `stop`)."""

    def __init__(self, handler_class: type, name: str) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
