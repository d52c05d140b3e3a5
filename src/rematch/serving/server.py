"""Running the app under uvicorn: in the foreground (``rematch serve``) or on a thread (tests, benchmark).

Shutdown is graceful in both: uvicorn stops accepting connections, waits up to
``shutdown_timeout_s`` for requests in flight, then the app's lifespan lets the model
worker finish its queue and stops it. Both forms bind their socket themselves, before
uvicorn starts (:func:`listening_socket`): a busy port is then one clear error raised
before the model loads (uvicorn logged it and exited with status 1, after the load), and
an ephemeral port (0) is known before the server starts, so no two tests race for a port.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

from rematch.serving.settings import ServeSettings


def uvicorn_config(app, settings: ServeSettings, log_level: str = "info", own_logging: bool = True):
    """``own_logging=False`` leaves the process's logging configuration alone (uvicorn's loggers
    then propagate to the root logger): a server embedded in tests or a benchmark adds no handlers."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=settings.shutdown_timeout_s, server_header=False,
                          proxy_headers=False, access_log=log_level in ("debug", "info"),
                          log_config=LOGGING_CONFIG if own_logging else None)


class PortUnavailableError(OSError):
    """The address to listen on cannot be bound (in use, not ours, or not an address of this machine)."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port), for uvicorn to listen on.

    SO_REUSEADDR lets a restarted server take its port back from connections still in
    TIME_WAIT; on Linux it does not let two servers share a port that one is listening on.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = "is already in use (another server? choose another --port)" if error.errno == errno.EADDRINUSE \
            else f"cannot be bound: {error.strerror or error}"
        raise PortUnavailableError(error.errno, f"port {port} on {host} {reason}") from error
    return sock


def serve(app, settings: ServeSettings, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (then finish in-flight requests and return).

    ``sock``: a socket from :func:`listening_socket`, bound before the (slow) model load so
    that a busy port is refused first; bound here when not given.
    """
    import uvicorn

    sock = sock or listening_socket(settings.host, settings.port)
    try:
        uvicorn.Server(uvicorn_config(app, settings, log_level)).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """``with ServerThread(app, settings) as server: httpx.get(server.url + "/health")``.

    Listens on ``settings.host`` at an ephemeral port unless ``settings.port`` is set;
    leaving the block shuts the server down gracefully and joins its thread.
    """

    def __init__(self, app, settings: ServeSettings | None = None, log_level: str = "warning",
                 start_timeout_s: float = 60.0):
        import uvicorn

        self.settings = settings or ServeSettings(port=0)
        self.socket = listening_socket(self.settings.host, self.settings.port)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{self.settings.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, self.settings, log_level, own_logging=False))
        self.thread = threading.Thread(target=self._run, name=f"rematch-serve-{self.port}", daemon=True)
        self.start_timeout_s = start_timeout_s
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as error:  # noqa: BLE001 - reported by start()/stop()
            self.error = error

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self.error or 'timed out'}")
            time.sleep(0.01)
        return self

    def request_stop(self) -> None:
        """Begin a graceful shutdown (returns at once; :meth:`stop` waits for it)."""
        self.server.should_exit = True

    def stop(self, timeout_s: float | None = None) -> None:
        self.request_stop()
        self.thread.join(timeout_s if timeout_s is not None else self.settings.shutdown_timeout_s + 30)
        self.socket.close()
        if self.thread.is_alive():
            raise RuntimeError("the server thread did not stop")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
