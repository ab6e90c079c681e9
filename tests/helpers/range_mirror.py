"""A local HTTP mirror for download tests: Range requests, a slow mode and a dropped connection.

``http.server`` serves whole files only; the download step resumes with Range
requests, so the tests and the fault-injection harness (``fault_injection.py``)
need this small handler. Subclass it per use so that each has its own ``ranges`` record:

    class Mirror(RangeMirror):
        ranges = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Mirror, directory=root))
"""

from __future__ import annotations

import http.server
import time
from pathlib import Path


class RangeMirror(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support and records the Range headers it got.

    ``pause``: seconds slept after every ``chunk`` bytes, so that a transfer can
    be killed midway. ``cut``: a full (non-Range) response ends after that many
    bytes, as a dropped connection would.
    """

    ranges: list[str | None] = []
    chunk: int = 64 << 10
    pause: float = 0.0
    cut: int | None = None

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.removeprefix("bytes=").split("-")[0]) if header else 0
        if header and start >= len(data):
            self.send_error(416)
            return
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.cut is not None and not header:
            body = body[: self.cut]
        try:
            for at in range(0, len(body), self.chunk):
                self.wfile.write(body[at : at + self.chunk])
                if self.pause:
                    time.sleep(self.pause)
        except (BrokenPipeError, ConnectionResetError):
            pass
