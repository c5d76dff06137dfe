"""A tiny HTTP server uploaded into sandboxes by the port-proxy tests (python3 stdlib only).

GET streams two server-sent events 1.5 s apart (``data: tick-0``, ``data: tick-1``); POST echoes its body.
Run as ``python3 sse_server.py PORT``.
"""

import http.server
import sys
import time
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for n in range(2):
            self.wfile.write(b"data: tick-%d\n\n" % n)
            self.wfile.flush()
            time.sleep(1.5)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


SOURCE = Path(__file__).read_bytes()

if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
