"""A tiny HTTP service that answers with what it saw: who it is, the method, path and headers.

It stands in for an application behind a sidecar in the demo and in tests, so a response proves
which service was reached and which headers (XFCC, x-meshward-*) the sidecar passed on.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshward.lifecycle import StartStop
from meshward.net import LOOPBACK


class _Handler(BaseHTTPRequestHandler):
    server: EchoHTTPServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the ACK of the
    # headers, which a kept-alive peer (Envoy) delays by 40 ms. TCP_NODELAY sends both at once.
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = {
            "service": self.server.service_name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_bytes": len(body),
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # the sidecar's access log is the record; keep test output clean


class EchoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service_name: str, port: int = 0, host: str = LOOPBACK) -> None:
        self.service_name = service_name
        super().__init__((host, port), _Handler)


class EchoServer(StartStop):
    """An echo service on a background thread; ``port`` is known once constructed."""

    def __init__(self, service_name: str = "echo", port: int = 0, host: str = LOOPBACK) -> None:
        self._server = EchoHTTPServer(service_name, port, host)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"echo-{service_name}", daemon=True
        )

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an echo HTTP service on loopback.")
    parser.add_argument("--name", default="echo", help="service name reported in every answer")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args()
    server = EchoHTTPServer(args.name, args.port)
    print(json.dumps({"service": args.name, "port": server.server_address[1]}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
