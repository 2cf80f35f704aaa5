"""The HTTP server of the REST port, as TF Serving's http_server.cc and net_http run it.

It reads requests and frames replies; what a request means is the `api` object's business
(rest_api.RestApi: `handle(method, path, body, headers)` and `refuse(method, path, code, message,
http_status)`, each returning (HTTP status, body, content type), and `handle` optionally a dict
of extra reply headers after them). Request bodies may be gzip (`Content-Encoding`) or chunked
(`Transfer-Encoding`); bodies over the limit, bad framing and bad gzip are refused here, and at
most `max_concurrent_posts` POSTs run at once. `OPTIONS` is the api's `preflight(path, origin)`,
and every reply carries the api's `extra_headers(path)` (CORS).
"""

from __future__ import annotations

import errno
import http.server
import logging
import socket
import threading
import time
import urllib.parse
import zlib

import grpc

from serving.errors import INTERNAL_ERROR
from serving.json_tensor import error_json
from serving.ports import in_use_error

LOG = logging.getLogger("serving.http_server")


class _BodyRefused(Exception):
    """A request body the HTTP layer will not pass on: gRPC code, message, HTTP status, and
    whether the connection must close (the rest of the body was not read)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None, close: bool = False):
        super().__init__(message)
        self.code, self.message, self.http_status, self.close = code, message, http_status, close


class _Handler(http.server.BaseHTTPRequestHandler):
    api: object  # rest_api.RestApi
    max_body_bytes: int
    post_slots: threading.BoundedSemaphore  # one per inference POST allowed to run at once
    max_concurrent_posts: int
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm on, the body would wait for the
    # client's delayed ACK of the headers (what that cost a 1-image :predict: bench/README.md).
    disable_nagle_algorithm = True

    def do_GET(self):
        self._dispatch("GET", None)

    def do_OPTIONS(self):
        """A CORS preflight; a body (browsers send none) is read and dropped, as TF Serving reads it."""
        length = self.headers.get("Content-Length", "0").strip()
        if self.headers.get("Transfer-Encoding") is None and length.isdigit() and int(length) <= self.max_body_bytes:
            self._drain(int(length))
        else:
            self.close_connection = True  # the body is not read: nothing after it can be parsed
        self._send(*self.api.preflight(self.path, self.headers.get("Origin")))

    def do_POST(self):
        chunked, length, framing_error = self._body_framing()
        if framing_error is not None:
            self.close_connection = True  # where the body ends is unknown: nothing after it can be parsed
            return self._send(*framing_error)
        if not chunked and length > self.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as a request
            return self._send(*self._too_large(f"Request body of {length} bytes"))
        # Take a slot before reading the body, so refused requests never buffer theirs.
        if not self.post_slots.acquire(blocking=False):
            if chunked:
                self.close_connection = True  # a chunked body is not drained: its size is unknown
            return self._refuse_busy(0 if chunked else length)
        try:
            try:
                body = self._read_chunked() if chunked else self.rfile.read(length)
                body = self._decoded(body)
            except _BodyRefused as refusal:
                self.close_connection = self.close_connection or refusal.close
                return self._send(*self.api.refuse("POST", self.path, refusal.code, refusal.message,
                                                   refusal.http_status))
            self._dispatch("POST", body)
        finally:
            self.post_slots.release()

    def _body_framing(self):
        """(chunked, Content-Length, error reply or None) from the request headers.

        Transfer-Encoding wins over Content-Length (RFC 9112 6.3); only "chunked" is a
        transfer coding we read, as libevent behind TF Serving.
        """
        transfer = self.headers.get("Transfer-Encoding")
        if transfer is not None:
            if transfer.strip().lower() != "chunked":
                return False, 0, self.api.refuse("POST", self.path, grpc.StatusCode.UNIMPLEMENTED,
                                                 f"Unsupported Transfer-Encoding: {transfer}")
            return True, 0, None
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            return False, 0, self.api.refuse("POST", self.path, grpc.StatusCode.INVALID_ARGUMENT,
                                             "Invalid Content-Length header")
        return False, length, None

    def _too_large(self, what: str):
        return self.api.refuse("POST", self.path, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{what} exceeds the limit of {self.max_body_bytes} bytes", 413)

    def _read_chunked(self) -> bytes:
        """A chunked body (RFC 9112 7.1), refused once it passes max_body_bytes.

        Any refusal closes the connection, so unread chunks are never parsed as a request.
        """
        parts, total = [], 0
        while True:
            size = self._chunk_size(self.rfile.readline(1026))
            if size == 0:
                break
            if total + size > self.max_body_bytes:
                raise _BodyRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Chunked request body exceeds the limit "
                                   f"of {self.max_body_bytes} bytes", 413, close=True)
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, "Malformed chunked request body", close=True)
            parts.append(data)
            total += size
        for _ in range(100):  # trailer fields up to the blank line, ignored
            if self.rfile.readline(8194) in (b"\r\n", b"\n", b""):
                return b"".join(parts)
        raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, "Malformed chunked request body", close=True)

    @staticmethod
    def _chunk_size(line: bytes) -> int:
        text = line.split(b";", 1)[0].strip()  # chunk extensions after ';' are ignored
        if not line.endswith(b"\n") or not 0 < len(text) <= 16 or text.strip(b"0123456789abcdefABCDEF"):
            raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, "Malformed chunked request body", close=True)
        return int(text, 16)

    def _decoded(self, body: bytes) -> bytes:
        """The body, gunzipped when Content-Encoding names gzip (as net_http's auto_uncompress_input).

        The decompressed size is held to max_body_bytes as well, so a small "gzip bomb" is
        refused after inflating at most one byte past the limit.
        """
        if "gzip" not in self.headers.get("Content-Encoding", "").lower():
            return body
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error as error:
            raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to decompress the gzip request body: {error}")
        if len(inflated) > self.max_body_bytes:
            raise _BodyRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Decompressed request body exceeds the limit "
                               f"of {self.max_body_bytes} bytes", 413)
        if not inflater.eof or inflater.unused_data:
            raise _BodyRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               "Failed to decompress the gzip request body: truncated or followed by other data")
        return inflated

    def _refuse_busy(self, length: int) -> None:
        """429 without queueing; the body is read and dropped so the connection stays usable."""
        self._drain(length)
        message = f"Concurrent REST request limit of {self.max_concurrent_posts} exceeded, retry later"
        self._send(429, error_json(message), "application/json")

    def _drain(self, length: int) -> None:
        """Read and drop a body we will not use: closing a socket with unread data resets the
        connection, and the client may then lose our reply."""
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, unsupported method, ...)
        as JSON, like every other reply, instead of its HTML page.

        An unsupported method (PUT, DELETE, ...) gets TF Serving's 400 "Malformed request".
        """
        if code == 501 and self.command:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if 0 < length <= self.max_body_bytes:
                self._drain(length)
            self.close_connection = True
            message = f"Malformed request: {self.command} {urllib.parse.urlsplit(self.path).path}"
            return self._send(*self.api.refuse(self.command, self.path, grpc.StatusCode.INVALID_ARGUMENT, message))
        self.close_connection = True
        text = message or self.responses.get(code, ("Error",))[0]
        self._send(code, error_json(text), "application/json")

    def _dispatch(self, method: str, body):
        try:
            reply = self.api.handle(method, self.path, body, self.headers)
        except Exception:
            LOG.exception("unexpected REST error")
            reply = 500, error_json(INTERNAL_ERROR), "application/json"
        self._send(*reply)

    def _send(self, status: int, payload: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in self.api.extra_headers(getattr(self, "path", "")):
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")  # so the client opens a new one for its next request
        self.end_headers()
        self.wfile.write(payload)
        if self.close_connection:
            self._linger()

    def _linger(self, budget_bytes: int = 1 << 20, seconds: float = 2.0) -> None:
        """A lingering close: stop sending, then read and drop what the client still sends (at
        most `budget_bytes` or `seconds`). Closing a socket with unread data resets the
        connection, and the client may then lose the reply it has not read yet."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            while budget_bytes > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                data = self.connection.recv(min(1 << 16, budget_bytes))
                if not data:
                    break
                budget_bytes -= len(data)
        except OSError:
            pass  # the client is gone or slow: nothing more to do for it

    def log_message(self, format, *args):  # route access logs to logging, not stderr
        LOG.debug("%s - %s", self.address_string(), format % args)


class RestServer:
    """A ThreadingHTTPServer serving a RestApi on host:port (port 0 picks a free one).

    At most `max_concurrent_posts` POSTs run at once; more get HTTP 429 at once (the REST
    twin of gRPC's maximum_concurrent_rpcs) rather than all competing for the CPU.
    """

    def __init__(self, api, host: str, port: int, max_body_bytes: int,
                 max_concurrent_posts: int):
        handler = type("RestHandler", (_Handler,), {
            "api": api, "max_body_bytes": max_body_bytes, "max_concurrent_posts": max_concurrent_posts,
            "post_slots": threading.BoundedSemaphore(max_concurrent_posts)})
        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise in_use_error("REST", host, port, "--rest-port") from None
            raise
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def close(self) -> None:
        """Give back the port of a server that was never started."""
        self.httpd.server_close()
