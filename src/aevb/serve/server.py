"""Running the explorer: uvicorn on a socket of this machine, until Ctrl-C (``aevb serve``) or until told to stop.

    serve_run("runs/mnist", port=0, echo=print)   # blocks; prints http://127.0.0.1:PORT/; Ctrl-C stops it
    with running(create_app(explorer)) as url:     # in a thread, for tests and benchmarks
        ...

The socket is bound before uvicorn starts, so port 0 (any free port) is
known before the address is printed and no other process can take it in
between.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from aevb.errors import UserError
from aevb.run.open import open_run
from aevb.serve.app import create_app
from aevb.serve.explorer import Explorer

LOOPBACK = "127.0.0.1"


def bind(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a UserError where it cannot be had."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise UserError(f"--host {host!r} is not an IP address; give one such as 127.0.0.1") from None
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it a
    # response's headers and body, written apart, wait on the client's delayed ACK (40 ms a request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port, "
                        f"or leave it out for a free one") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server(app: Starlette) -> uvicorn.Server:
    # the access log would print a line per slider move; errors are still printed
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def serve_run(run_dir: str | Path, *, host: str = LOOPBACK, port: int = 0, device: str = "auto",
              echo: Callable[[str], None] = print) -> None:
    """Serve the explorer of a run on ``host``:``port`` until Ctrl-C (SIGINT) or SIGTERM."""
    run = open_run(run_dir, device)
    sock = bind(host, port)
    try:
        echo(f"model: {run.provenance}")
        app = create_app(Explorer.from_run(run))
        if not ipaddress.ip_address(host).is_loopback:
            echo(f"note: listening on {host}, which other machines may reach; 127.0.0.1 keeps it on this one")
        echo(f"explorer: {address(sock)}  (Ctrl-C stops it)")
        server = _server(app)
        try:
            server.run(sockets=[sock])  # uvicorn stops on SIGINT/SIGTERM, then raises the signal again
        except KeyboardInterrupt:
            pass
        echo("stopped")
    finally:
        sock.close()


@contextlib.contextmanager
def running(app: Starlette, host: str = LOOPBACK, port: int = 0) -> Iterator[str]:
    """Serve ``app`` in a thread of this process while the block runs; yields its address."""
    sock = bind(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the explorer's server did not start")
            time.sleep(0.01)
        yield address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
