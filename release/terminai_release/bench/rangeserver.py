"""A one-file HTTP server with ETag and Range (as a CDN or S3 serves), run
as its own process so the client being measured does not share its GIL.

    python -m terminai_release.bench.rangeserver FILE PORTFILE [--cut-once]

Writes the port to PORTFILE; with --cut-once, the first response is cut
after half the file. The total body bytes sent are written to PORTFILE.bytes
after every response.
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file", type=Path)
    parser.add_argument("portfile", type=Path)
    parser.add_argument("--cut-once", action="store_true")
    args = parser.parse_args()
    size = args.file.stat().st_size
    state = {"bytes": 0, "cut": args.cut_once}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            start = 0
            if self.headers.get("Range") and self.headers.get("If-Range") == '"bench"':
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("ETag", '"bench"')
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            with args.file.open("rb") as f:
                f.seek(start)
                while chunk := f.read(1 << 20):
                    if state["cut"] and state["bytes"] >= size // 2:
                        state["cut"] = False
                        self.close_connection = True
                        break
                    self.wfile.write(chunk)
                    state["bytes"] += len(chunk)
            Path(f"{args.portfile}.bytes").write_text(str(state["bytes"]))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    args.portfile.write_text(str(httpd.server_address[1]))
    httpd.serve_forever()


if __name__ == "__main__":
    main()
