"""A port that another server already listens on is refused at start, for gRPC and REST alike.

gRPC's core sets SO_REUSEPORT on its listening sockets unless told not to, and then a second
server on the same port starts without a word while the kernel splits connections between the
two; our gRPC server turns it off (`GRPC_SERVER_OPTIONS`), and the REST port never sets it.
tensorflow_model_server keeps gRPC's default (docs/serving.md, differences table).
"""

from __future__ import annotations

import errno
import socket

GRPC_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def in_use_error(what: str, host: str, port: int, flag: str) -> ValueError:
    return ValueError(f"{what} port {port} on {host} is already in use (is another server running?); "
                      f"stop it or choose another port with {flag}")


def check_free(what: str, host: str, port: int, flag: str) -> None:
    """ValueError (in_use_error) when a socket already listens on host:port; port 0 always passes.

    A bind probe, taken before gRPC binds, so that a taken port is refused with this one message
    rather than after the gRPC core has logged its own error line; gRPC's bind (SO_REUSEPORT
    off) still refuses a port taken between the two.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # the server's own bind reports a bad host
    for family, kind, protocol, _name, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise in_use_error(what, host, port, flag) from None
