"""`callgate serve --workers N`: N cluster nodes on one port, one process each, one supervisor.

Theory of operation. One callgate process runs on one core. To use a machine's cores, the
parent (the supervisor) starts N workers, each a whole `callgate serve` with the same config
(a new interpreter, not a fork: nothing of the parent's state is shared), and each a node of the
configured cluster: the workers find each other's users through Redis exactly as nodes on
different machines do. Every worker binds the one server port with SO_REUSEPORT, and the Linux
kernel spreads new connections over them. What must differ between workers is derived from
the worker's index in one place (`worker_settings`): its node name, its audit trail file, its
metrics and admin ports (base port + index).

The parent holds one end of a socket pair per worker. The worker writes one JSON line on it
once it listens (`WorkerReady`: how the parent learns the ports to print), and reads it until
end of file: if the parent dies, even by SIGKILL, the kernel closes the parent's end and the
worker drains as on SIGTERM, so no worker outlives its supervisor.

The parent forwards SIGTERM, SIGINT and SIGHUP to every worker; after SIGTERM or SIGINT it
restarts nothing, waits for every worker to drain (each is bounded by `drain_timeout`; one that
takes longer than `drain_timeout` + STOP_MARGIN is killed) and exits: 0 when all stopped cleanly.
A worker that dies on its own is restarted after a backoff (1 s, doubled for each death that
follows a short run, up to 30 s); the others keep serving, and the cluster treats the dead
worker's devices as it treats a dead node's. A worker that fails before it ever listened
(a port taken, a bad key file) stops the whole command with its exit status: the same config
would fail again.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import trio

from callgate.config import REUSE_PORT_UNSUPPORTED, Settings, reuse_port_supported
from callgate.errors import ConfigError
from callgate.log import get_logger

log = get_logger("callgate.workers")

# A bound on a typo (`--workers 1600`): each worker is a process with its own Redis connections.
MAX_WORKERS = 256
# The first wait before a dead worker is restarted, the longest, and how long a worker must
# have run for its next death to wait the first backoff again (a crash loop waits longer).
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0
# A stopping worker drains within `drain_timeout` (+1 s, `_run_until_signalled`); the parent
# kills one that is still there this much later.
STOP_MARGIN = 5.0
# The longest line a worker writes on its socket pair.
MAX_READY_LINE = 4096
# `[cluster] node_name`'s pattern (config.py): what a host name is reduced to.
_NODE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")
_NODE_NAME_LENGTH = 32


def worker_node_name(node_name: str | None, index: int) -> str:
    """`<node_name or host name>-w<index>`, within `[cluster] node_name`'s 32 characters (the
    cluster adds a random suffix per run)."""
    base = node_name or _NODE_NAME_CHARACTERS.sub("-", socket.gethostname().split(".")[0])
    suffix = f"-w{index}"
    return (base.strip("-") or "node")[: _NODE_NAME_LENGTH - len(suffix)] + suffix


def worker_audit_path(path: str, index: int) -> str:
    """Worker `index`'s audit trail: `<path>.w<index>`, rotated as `<path>.w<index>.<time>`.

    Two workers never append to one file (two chains in one file would not verify), and a
    restarted worker continues its own file's chain. (`<path>.w0` is not one of `<path>`'s
    rotated files: those go on with a digit.)
    """
    return f"{path}.w{index}"


def worker_settings(settings: Settings, index: int) -> Settings:
    """What worker `index` runs: `settings` bound with SO_REUSEPORT, its own node name and
    audit trail, and its metrics, admin and cluster link ports at base + index (any free one
    for port 0)."""
    dumped = settings.model_dump()
    dumped["server"] = {**dumped["server"], "reuse_port": True}
    link_port = settings.cluster.link_port
    dumped["cluster"] = {
        **dumped["cluster"],
        "node_name": worker_node_name(settings.cluster.node_name, index),
        "link_port": link_port + index if link_port else 0,
    }
    dumped["audit"] = {**dumped["audit"], "path": worker_audit_path(settings.audit.path, index)}
    for section in ("metrics", "admin"):
        port = dumped[section]["port"]
        if port:
            dumped[section] = {**dumped[section], "port": port + index}
    return Settings.model_validate(dumped)


def check_workers(settings: Settings, count: int) -> None:
    """Raises: ConfigError, naming what to change, when `count` workers cannot run with
    `settings` (checked in the parent, before any worker starts)."""
    workers = f"--workers {count}"
    if not settings.cluster.enabled:
        raise ConfigError(
            f"{workers}: needs [cluster] enabled = true: each worker would otherwise be a"
            " separate switchboard that cannot see the other workers' users; set up the cluster"
            " (redis_url, key; docs/cluster.md) or run one worker"
        )
    if not reuse_port_supported():
        raise ConfigError(f"{workers}: {REUSE_PORT_UNSUPPORTED}; run one worker per port")
    if settings.audit.path == "-":
        raise ConfigError(
            f"audit.path: with {workers} each worker writes its own audit trail, and trails"
            " cannot share standard output; set audit.path to a file (worker i writes"
            " <path>.w<i>)"
        )
    ranges: list[tuple[str, str, int, int]] = [
        ("server.port", settings.server.host, settings.server.port, 1)
    ]
    if settings.metrics.enabled:
        ranges.append(("metrics.port", settings.metrics.host, settings.metrics.port, count))
    if settings.admin.enabled:
        ranges.append(("admin.port", settings.admin.host, settings.admin.port, count))
    for key, _, first, size in ranges:
        if first and first + size - 1 > 65535:
            raise ConfigError(
                f"{key}: with {workers} worker i listens on {key} + i, up to"
                f" {first + size - 1}: beyond 65535"
            )
    for at, (key, host, first, size) in enumerate(ranges):
        for other, other_host, other_first, other_size in ranges[at + 1 :]:
            if not first or not other_first or not _may_share(host, other_host):
                continue
            if first < other_first + other_size and other_first < first + size:
                raise ConfigError(
                    f"{key}, {other}: with {workers} the workers listen on"
                    f" {_span(first, size)} and {_span(other_first, other_size)}, which overlap"
                    f" (worker i uses metrics.port + i and admin.port + i); move {other} to"
                    f" {first + size} or above"
                )


def _may_share(host: str, other: str) -> bool:
    """Whether listeners on these hosts can conflict: the same, or either a wildcard."""
    return host == other or {host, other} & {"", "0.0.0.0", "::"} != set()  # noqa: S104


def _span(first: int, size: int) -> str:
    return str(first) if size == 1 else f"{first}-{first + size - 1}"


def reserve_port(host: str) -> socket.socket:
    """A socket bound with SO_REUSEPORT to a free port of `host`, never listening: with
    `port = 0` the parent picks the one port every worker then binds, and holds it for as long
    as it runs (a worker restarted later finds it still free for callgate). The kernel hands
    connections only to listening sockets, so this one takes none.

    Raises: OSError (the host cannot be resolved or bound).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            reserved.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        reserved.bind(address)
    except BaseException:
        reserved.close()
        raise
    return reserved


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """What a worker tells its supervisor once it listens (one JSON line)."""

    worker: int
    pid: int
    node: str  # the node name; the cluster adds a random suffix per run
    url: str
    metrics: str | None  # http://host:port of /metrics, /healthz and /readyz
    admin: str | None  # the admin API's base URL

    def line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> WorkerReady:
        """Raises: ValueError, TypeError (not a line a worker writes)."""
        fields: Any = json.loads(line)
        if not isinstance(fields, dict):
            raise TypeError(f"not a ready line: {line!r}")
        return cls(**fields)


# -- the worker's side ------------------------------------------------------------------------


async def report_ready(fd: int, ready: WorkerReady, nursery: trio.Nursery) -> None:
    """Tell the supervisor (on the socket pair `fd`) that this worker listens, then drain as on
    SIGTERM when the supervisor's end closes: it died, or it was killed."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
    await stream.send_all(ready.line())
    nursery.start_soon(_drain_when_orphaned, stream)


async def _drain_when_orphaned(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(MAX_READY_LINE):
            pass  # the supervisor writes nothing; end of file is the message
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()
    log.warning("the supervisor is gone: draining as on SIGTERM")
    signal.raise_signal(signal.SIGTERM)  # the same path as an operator's SIGTERM


# -- the supervisor's side --------------------------------------------------------------------

# How the supervisor starts worker `index`, handing it the socket pair's file descriptor.
WorkerCommand = Callable[[int, int], Sequence[str]]


def describe_exit(code: int) -> str:
    """`exit status 2`, or the signal that ended a process (`SIGKILL`)."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


@dataclass(slots=True)
class _Running:
    process: trio.Process
    channel: trio.SocketStream


class Supervisor:
    """Runs `count` workers until SIGTERM or SIGINT (see the module's docstring)."""

    def __init__(self, count: int, command: WorkerCommand, drain_timeout: float) -> None:
        self._count = count
        self._command = command
        self._stop_timeout = drain_timeout + 1 + STOP_MARGIN
        self._running: dict[int, _Running] = {}
        self._ready: dict[int, WorkerReady] = {}
        self._stopping = trio.Event()
        self._kill_at = float("inf")
        self._waits: set[trio.CancelScope] = set()
        # The exit status of the command: a worker's that failed to start, or set when one had
        # to be killed or stopped uncleanly.
        self._failure: int | None = None
        self._unclean = False
        # Around the signal loop; cancelled when a worker fails to start.
        self._listening = trio.CancelScope()

    def run(self) -> int:
        """Start the workers, supervise them, return the command's exit status."""
        return trio.run(self._main)

    async def _main(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for index in range(self._count):
                    nursery.start_soon(self._keep_running, index)
                with self._listening:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP: telling every worker to reload")
                            self._signal_all(signum)
                            continue
                        log.info("shutting down the workers", signal=name)
                        self._stop(signum)
                        break
        if self._failure is not None:
            return self._failure
        if self._unclean:
            return 1
        log.info("every worker stopped")
        return 0

    def _stop(self, signum: int) -> None:
        """Restart nothing more; forward `signum` (SIGTERM, SIGINT) to every worker; kill the
        ones still there after the drain's bound."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._kill_at = trio.current_time() + self._stop_timeout
        for scope in self._waits:
            scope.deadline = self._kill_at
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for running in self._running.values():
            if running.process.returncode is None:
                running.process.send_signal(signum)

    async def _keep_running(self, index: int) -> None:
        backoff = FIRST_BACKOFF
        started_once = False
        while not self._stopping.is_set():
            started = trio.current_time()
            running = await self._spawn(index)
            try:
                ready = await self._read_ready(running.channel)
                if ready is not None:
                    self._listening_now(ready, again=started_once)
                    started_once = True
                code = await self._wait(index, running.process)
            finally:
                del self._running[index]
                await running.channel.aclose()
            if self._stopping.is_set():
                # A clean stop: it drained (0), or the signal came before it could catch it.
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    listened = started_once  # set once it wrote its ready line
                    what = "worker did not stop cleanly" if listened else "worker failed to start"
                    log.error(what, worker=index, exit=describe_exit(code))
                    self._unclean = True
                return
            if ready is None and not started_once:
                # It never listened: the same config fails again. Its own stderr said why.
                log.error(
                    "worker failed to start; stopping the others",
                    worker=index,
                    exit=describe_exit(code),
                )
                self._failure = code if code > 0 else 1
                self._listening.cancel()
                self._stop(signal.SIGTERM)
                return
            uptime = trio.current_time() - started
            backoff = FIRST_BACKOFF if uptime >= STABLE_AFTER else backoff
            log.error(
                "worker exited; restarting it",
                worker=index,
                pid=running.process.pid,
                exit=describe_exit(code),
                restart_in=backoff,
            )
            with trio.move_on_after(backoff):
                await self._stopping.wait()
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _spawn(self, index: int) -> _Running:
        ours, theirs = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                list(self._command(index, theirs.fileno())), pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker holds its copy; end of file reaches us when it exits
        running = _Running(process, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        self._running[index] = running
        if self._stopping.is_set():
            process.send_signal(signal.SIGTERM)  # a stop came while it was being started
        return running

    async def _read_ready(self, channel: trio.SocketStream) -> WorkerReady | None:
        """The worker's ready line, or None when it exited (or broke off) before one."""
        line = b""
        while not line.endswith(b"\n") and len(line) < MAX_READY_LINE:
            try:
                chunk = await channel.receive_some(MAX_READY_LINE - len(line))
            except trio.BrokenResourceError:
                return None
            if not chunk:
                return None
            line += chunk
        try:
            return WorkerReady.parse(line)
        except (ValueError, TypeError):
            log.error("a worker wrote a line that is not a ready line", line=line[:200])
            return None

    def _listening_now(self, ready: WorkerReady, *, again: bool) -> None:
        self._ready[ready.worker] = ready
        if again:
            log.info("worker restarted", **asdict(ready))
        elif len(self._ready) == self._count:
            workers = [self._ready[index] for index in range(self._count)]
            log.info(
                "workers listening",
                url=workers[0].url,
                workers=[
                    {key: value for key, value in asdict(worker).items() if key != "url"}
                    for worker in workers
                ],
            )

    async def _wait(self, index: int, process: trio.Process) -> int:
        """The worker's exit status; after a stop's bound it is killed (and counted unclean)."""
        scope = trio.CancelScope(deadline=self._kill_at)
        self._waits.add(scope)
        try:
            with scope:
                return await process.wait()
        finally:
            self._waits.discard(scope)
        log.error("worker still draining past drain_timeout; killing it", worker=index)
        self._unclean = True
        process.kill()
        return await process.wait()
