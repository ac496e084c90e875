"""`callgate serve | token | check-config | revoke | audit | demo | admin`."""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import trio
from pydantic import ValidationError

import callgate
from callgate import __version__
from callgate.audit import AuditLog, signing_key
from callgate.auth import mint_token
from callgate.config import (
    HMAC_ALGORITHMS,
    MIN_HMAC_SECRET_BYTES,
    AuditSettings,
    Settings,
    development_keys,
    env_variable,
    is_loopback_host,
    load_settings,
    uses_development_secret,
)
from callgate.errors import ConfigError
from callgate.log import configure_logging, get_logger
from callgate.transport.server import RunningServer, host_port, listening_on, serve
from callgate.workers import (
    MAX_WORKERS,
    Supervisor,
    WorkerReady,
    check_workers,
    report_ready,
    reserve_port,
    worker_settings,
)

log = get_logger("callgate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"callgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run the signaling server")
    run.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    run.add_argument("--host", help="override server.host")
    run.add_argument("--port", type=int, help="override server.port")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        help="node processes sharing the port (SO_REUSEPORT, Linux), joined through the"
        " configured [cluster]; default 1 (docs/cluster.md)",
    )
    # Set by `--workers` on the processes it starts: the worker's index, and its end of the
    # socket pair to its supervisor (callgate/workers.py).
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)

    token = commands.add_parser("token", help="mint a development token with the HS secret")
    token.add_argument("sub", help="the user id the token is for")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--config", type=Path, help="TOML config file with auth.secret")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", type=Path)

    demo = commands.add_parser(
        "demo", help="the browser demo and a development server, on loopback (development only)"
    )
    demo.add_argument("--config", type=Path, default=Path("config/callgate.toml"))
    demo.add_argument("--port", type=int, default=8080, help="port of the demo page (8080)")

    audit = commands.add_parser("audit", help="verify or report on audit trail files")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check a trail's sequence, chains, signed checkpoints and anchor"
    )
    report = audit_commands.add_parser("report", help="one row per call, and refusals per user")
    for command in (verify, report):
        command.add_argument("files", nargs="+", type=Path)
        command.add_argument(
            "--public-key",
            type=Path,
            action="append",
            default=[],
            help="Ed25519 public key (PEM) that signs checkpoints; repeat for rotated keys",
        )
        command.add_argument(
            "--anchor",
            type=Path,
            action="append",
            default=[],
            help="anchor file (checkpoint lines kept on other storage, or a syslog export)",
        )
        command.add_argument(
            "--config",
            type=Path,
            help="config file: its [audit] section only (HMAC key, signing key, anchor_path)",
        )
    report.add_argument(
        "--unverified", action="store_true", help="report without verifying the trail first"
    )
    report.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    report.add_argument("--user", help="only calls and refusals of this user")
    report.add_argument("--since", help="only records at or after this time (RFC 3339 or unix)")
    report.add_argument("--until", help="only records at or before this time")
    keygen = audit_commands.add_parser(
        "keygen", help="make an Ed25519 checkpoint signing key; prints its public key"
    )
    keygen.add_argument("out", type=Path, help="where to write the private key (PEM, mode 0600)")
    public = audit_commands.add_parser(
        "public-key", help="print the public key of the configured signing key, for auditors"
    )
    public.add_argument("--config", type=Path)
    retain = audit_commands.add_parser(
        "retain", help="record in the anchor that the trail is kept from this file on"
    )
    retain.add_argument("file", type=Path, help="the oldest log file that is kept")
    retain.add_argument("--config", type=Path)

    revoke = commands.add_parser(
        "revoke", help="revoke a token (by jti) or a user's tokens issued before now"
    )
    revoke.add_argument("--config", type=Path, help="TOML config file naming auth.revocation_file")
    revoke.add_argument("--file", type=Path, help="the revocation file (default: from the config)")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--jti", help="the token id to revoke")
    target.add_argument("--user", help="revoke every token of this user issued before --before")
    revoke.add_argument(
        "--before", type=float, help="unix time for --user (default: now)", default=None
    )
    _admin_parser(
        commands.add_parser(
            "admin",
            help="the admin API of a running server (docs/admin.md); the key comes from"
            f" ${ADMIN_KEY_VARIABLE}",
        )
    )
    return parser


def _worker_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of workers from 1 to {MAX_WORKERS}")
    return count


ADMIN_KEY_VARIABLE = "CALLGATE_ADMIN_KEY"


def _admin_parser(admin: argparse.ArgumentParser) -> None:
    admin.add_argument("--url", help="the admin API (default: from --config, else port 9465)")
    admin.add_argument("--config", type=Path, help="TOML config file with [admin] host and port")
    actions = admin.add_subparsers(dest="admin_command", required=True)
    actions.add_parser("status", help="this node: accepting, ready, counts")
    for name, states in (
        ("connections", ["authenticated", "unauthenticated"]),
        ("calls", ["ringing", "connected"]),
        ("users", None),
    ):
        listing = actions.add_parser(name, help=f"list {name} (JSON, one page)")
        listing.add_argument("--user", help="only this user's")
        if states is not None:
            listing.add_argument("--state", choices=states)
            listing.add_argument("--min-age", type=float, help="only those older (seconds)")
        listing.add_argument("--limit", type=int, help="page size (default 100)")
        listing.add_argument("--cursor", help="the next_cursor of the previous page")
    end = actions.add_parser("end-call", help="end a call: both sides get ended_by_operator")
    end.add_argument("call_id")
    end.add_argument("--user", help="one of its users, when several calls share the id")
    disconnect = actions.add_parser("disconnect", help="close every device of a user (4010)")
    disconnect.add_argument("user")
    drain = actions.add_parser("drain", help="stop sign-ins, /readyz 503, then close with 1001")
    drain.add_argument("--grace", type=float, help="seconds before connections are closed")
    actions.add_parser("undrain", help="take sign-ins again")
    actions.add_parser("reload", help="reload keys and revocations now")
    for action in ("end-call", "disconnect", "drain", "undrain", "reload"):
        actions.choices[action].add_argument(
            "--reason", required=True, help="why (required; written to the audit trail)"
        )


def admin_request(
    url: str, key: str, method: str, path: str, body: Mapping[str, object] | None = None
) -> tuple[int, dict[str, object]]:
    """One admin API request (urllib, stdlib): the status and the JSON answer.

    Raises: OSError when the server cannot be reached.
    """
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - http(s) to the operator's own server
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            try:
                answer = json.loads(error.read())
            except ValueError:
                answer = {"error": error.reason}
        return error.code, answer


def _admin(args: argparse.Namespace) -> int:
    import json
    from urllib.parse import urlencode

    key = os.environ.get(ADMIN_KEY_VARIABLE, "")
    if not key:
        raise ConfigError(f"{ADMIN_KEY_VARIABLE}: set it to your admin key (see [admin] keys)")
    url = args.url
    if url is None:
        admin = load_settings(args.config).admin if args.config else None
        host, port = (admin.host, admin.port) if admin else ("127.0.0.1", 9465)
        url = f"http://{host_port(host, port)}"
    command = args.admin_command
    body: dict[str, object] | None = None
    if command in ("status", "connections", "calls", "users"):
        names = ("user", "state", "min_age", "limit", "cursor")
        query = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        method, path = "GET", f"/v1/{command}" + (f"?{urlencode(query)}" if query else "")
    else:
        method = "POST"
        body = {"reason": args.reason}
        if command == "end-call":
            path = "/v1/calls/end"
            body.update({"call_id": args.call_id, **({"user": args.user} if args.user else {})})
        elif command == "disconnect":
            path, body["user"] = "/v1/users/disconnect", args.user
        else:
            path = f"/v1/{command}"
            if command == "drain" and args.grace is not None:
                body["grace"] = args.grace
    status, answer = admin_request(url, key, method, path, body)
    if status != 200:
        print(f"callgate admin: {status} {answer.get('error', answer)}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0 if answer.get("ok", True) else 1


def _with_overrides(settings: Settings, host: str | None, port: int | None) -> Settings:
    server = settings.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    # Re-validate: a command-line port must obey the same bounds as the config file.
    try:
        return Settings.model_validate({**settings.model_dump(), "server": server.model_dump()})
    except ValidationError as exc:
        raise ConfigError(
            "; ".join(
                f"--{error['loc'][-1]}: {error['msg']}"
                for error in exc.errors(include_url=False, include_input=False)
            )
        ) from None


def _refuse_development_secret_off_loopback(settings: Settings) -> None:
    key = uses_development_secret(settings)
    if key is not None and not is_loopback_host(settings.server.host):
        variable = "CALLGATE_" + key.replace(".", "_").upper()
        raise ConfigError(
            f"{key}: the shipped development secret may only be used on loopback, not on"
            f" {settings.server.host!r}; set {variable} to a secret of your own"
        )


Announce = Callable[[RunningServer, trio.Nursery], Awaitable[None]]


def _tune_garbage_collector() -> None:
    """After start-up, keep the cyclic GC from re-walking everything imported and built so far.

    Connection setup otherwise slows down as connections grow: every full collection walks every
    tracked object (docs/performance.md, W3). Frozen objects are never collected; rarer young
    collections cut the per-connection cost further. Reference cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _run_until_signalled(settings: Settings, announce: Announce) -> int:
    """Serve until SIGTERM or SIGINT, then drain; SIGHUP reloads keys and revocations.

    Signals are received as messages, so SIGINT/SIGTERM drain instead of interrupting.
    """
    try:
        audit = AuditLog.open(settings.audit)
    except OSError as exc:
        # The failing path may be a parent directory (a file where a directory should be).
        anchor = settings.audit.anchor_path
        if anchor is not None and exc.filename is not None and str(exc.filename) == anchor:
            raise ConfigError(
                f"audit.anchor_path: cannot append to {anchor}: {exc.strerror or exc}"
            ) from None
        where = f" ({exc.filename})" if exc.filename and exc.filename != settings.audit.path else ""
        raise ConfigError(
            f"audit.path: cannot write the audit trail to {settings.audit.path}:"
            f" {exc.strerror or exc}{where}"
        ) from None
    if not audit.tamper_evident:
        log.warning(
            "audit.key and audit.signing_key are not set: audit records are numbered but not"
            " tamper-evident"
        )

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                running: RunningServer = await nursery.start(serve, settings, audit)
                _tune_garbage_collector()
                await announce(running, nursery)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading keys and revocations")
                        running.reload()
                        continue
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    with trio.move_on_after(settings.server.drain_timeout + 1):
                        await running.shutdown()
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        audit.close()
    log.info("stopped")
    return 0


# What `callgate serve` says once at start when the mypyc build does not run (callgate/_accel.py).
NOT_COMPILED_BECAUSE = {
    "pure": "no compiled build is installed (no C compiler when it was installed?)",
    "stale": "a compiled source changed since the build: pip install -e . rebuilds it",
    "forced-pure": "CALLGATE_PURE=1 is set",
}


def _serve(args: argparse.Namespace) -> int:
    worker: int | None = args.worker
    configure_logging(level=args.log_level, tags=None if worker is None else {"worker": worker})
    settings = _with_overrides(load_settings(args.config), args.host, args.port)
    _refuse_development_secret_off_loopback(settings)
    if worker is None and args.workers > 1:
        return _supervise(args, settings)
    if worker is not None:
        settings = worker_settings(settings, worker)

    async def announce(running: RunningServer, nursery: trio.Nursery) -> None:
        # Which build runs: "compiled", or why not (callgate/_accel.py).
        log.info(
            "listening",
            url=running.url,
            audit=settings.audit.path,
            hot_path=callgate.IMPLEMENTATION,
        )
        if worker is not None and args.worker_fd is not None:
            await report_ready(args.worker_fd, _worker_ready(worker, settings, running), nursery)
        if worker:
            return  # the advice below is worker 0's to give, once
        if callgate.IMPLEMENTATION != "compiled":
            log.warning(
                "hot path not compiled: running as pure Python (slower)",
                why=NOT_COMPILED_BECAUSE[callgate.IMPLEMENTATION],
            )
        _warn_audit_gaps(settings.audit)
        for setting, what, risk in development_keys(settings):
            section, key = setting.split(".")
            own = (
                "a key of your own (`callgate audit keygen`)"
                if setting == "audit.signing_key"
                else f"one of your own ({MIN_HMAC_SECRET_BYTES}+ bytes)"
            )
            log.warning(
                f"{setting} is the shipped development {what}: loopback only",
                risk=risk,
                fix=f"set [{section}] {key} in the config file, or {env_variable(section, key)},"
                f" to {own}",
            )
        if running.admin_port is not None:
            admin = settings.admin
            log.info(
                "admin API listening",
                url=f"http://{host_port(admin.host, running.admin_port)}",
                operators=sorted(admin.keys),
            )
            if not is_loopback_host(admin.host):
                log.warning(
                    "the admin API listens beyond loopback: only operators should reach it",
                    host=admin.host,
                )
        hint = _token_hint(settings, args.config, os.environ)
        if hint is not None and is_loopback_host(settings.server.host):
            log.info("get a token in another terminal", connect=running.url, **hint)

    return _run_until_signalled(settings, announce)


def _worker_ready(worker: int, settings: Settings, running: RunningServer) -> WorkerReady:
    metrics, admin = settings.metrics, settings.admin
    return WorkerReady(
        worker=worker,
        pid=os.getpid(),
        node=settings.cluster.node_name or "",
        url=running.url,
        metrics=None
        if running.metrics_port is None
        else f"http://{host_port(metrics.host, running.metrics_port)}",
        admin=None
        if running.admin_port is None
        else f"http://{host_port(admin.host, running.admin_port)}",
    )


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    """`serve --workers N` (callgate/workers.py): N workers on one port, supervised."""
    check_workers(settings, args.workers)
    server = settings.server
    reserved = None
    port = server.port
    if port == 0:
        # Each worker would pick a port of its own: the parent picks one for all of them.
        with listening_on(("server.host", "server.port"), server.host, port):
            reserved = reserve_port(server.host)
        port = reserved.getsockname()[1]
        check_workers(_with_overrides(settings, None, port), args.workers)

    def command(index: int, fd: int) -> list[str]:
        argv = [sys.executable, "-m", "callgate", "serve", "--log-level", args.log_level]
        if args.config is not None:
            argv += ["--config", str(args.config)]
        return [
            *argv,
            *("--host", server.host, "--port", str(port)),
            *("--worker", str(index), "--worker-fd", str(fd)),
        ]

    try:
        return Supervisor(args.workers, command, server.drain_timeout).run()
    finally:
        if reserved is not None:
            reserved.close()


def _warn_audit_gaps(audit: AuditSettings) -> None:
    """What an auditor could not check in this trail, said once at start."""
    if audit.key is not None and audit.signing_key is None and audit.signing_key_file is None:
        log.warning(
            "audit.signing_key is not set: checkpoints are not signed, so only holders of the"
            " HMAC key can verify the trail, and they could forge it"
        )
    anchors = (audit.anchor_path, audit.anchor_syslog, audit.anchor_url)
    if audit.path != "-" and all(anchor is None for anchor in anchors):
        log.warning(
            "audit.anchor_path, anchor_syslog and anchor_url are not set: a cut of the newest"
            " audit records cannot be detected (docs/audit-log.md, Anchoring)"
        )


# The environment overrides `callgate token` reads to mint a token the server accepts.
_TOKEN_VARIABLES = tuple(
    env_variable("auth", key) for key in ("secret", "algorithms", "issuer", "audience")
)


def _token_hint(
    settings: Settings, config: Path | None, environ: Mapping[str, str]
) -> dict[str, object] | None:
    """A `callgate token` command that mints tokens this server accepts: same config file, and
    the same `CALLGATE_AUTH_*` overrides in its environment (named, never their values)."""
    hmac = set(settings.auth.algorithms) & HMAC_ALGORITHMS
    if settings.auth.secret is None or not hmac:
        return None
    command = [_callgate_command(), "token", "alice"]
    if config is not None:
        command += ["--config", str(config)]
    hint: dict[str, object] = {"command": shlex.join(command)}
    same = [name for name in _TOKEN_VARIABLES if name in environ]
    if same:
        hint["with_environment"] = same
    return hint


def _callgate_command() -> str:
    """How to run `callgate` from here: the script beside this interpreter (.venv/bin), if any."""
    script = Path(sys.executable).parent / "callgate"
    if not script.is_file():
        return "callgate"
    relative = os.path.relpath(script)
    if relative.startswith(".."):
        return str(script)
    return relative if os.sep in relative else f".{os.sep}{relative}"


def _demo(args: argparse.Namespace) -> int:
    from callgate.demo import check_demo_allowed, serve_demo

    configure_logging()
    settings = load_settings(args.config)
    check_demo_allowed(settings)

    async def announce(running: RunningServer, nursery: trio.Nursery) -> None:
        host = settings.server.host
        with listening_on(("server.host", "--port (of the demo page)"), host, args.port):
            port = await nursery.start(serve_demo, settings, running.url, host, args.port)
        page = f"http://{host}:{port}/"
        log.info(
            "demo ready: open two tabs",
            alice=f"{page}?user=alice&callee=bob",
            bob=f"{page}?user=bob&callee=alice",
            signaling=running.url,
        )

    return _run_until_signalled(settings, announce)


def _token(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    hmac_algorithms = [a for a in settings.auth.algorithms if a in HMAC_ALGORITHMS]
    if settings.auth.secret is None or not hmac_algorithms:
        raise ConfigError("auth.secret: `callgate token` needs an HS256/384/512 secret")
    if args.ttl <= 0:
        raise ConfigError("--ttl must be a positive number of seconds")
    claims = {}
    if settings.auth.issuer:
        claims["iss"] = settings.auth.issuer
    if settings.auth.audience:
        claims["aud"] = settings.auth.audience
    token = mint_token(
        settings.auth.secret.get_secret_value(),
        args.sub,
        ttl=args.ttl,
        now=int(time.time()),
        algorithm=hmac_algorithms[0],
        **claims,
    )
    print(token)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from callgate.auth import TokenVerifier

    settings = load_settings(args.file)
    TokenVerifier.from_settings(settings.auth)
    signing_key(settings.audit)  # a bad signing key is named here, not at the first checkpoint
    if settings.auth.revocation_file is not None:
        from callgate.revocation import load_revocations

        load_revocations(settings.auth.revocation_file)
    print(f"{args.file}: ok")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from callgate.revocation import add_revocation

    path = args.file
    if path is None:
        path = load_settings(args.config).auth.revocation_file
    if path is None:
        raise ConfigError("auth.revocation_file: not set; pass --file or set it in --config")
    before = args.before if args.before is not None else time.time()
    revoked = add_revocation(path, token_id=args.jti, user=args.user, before=before)
    what = f"token {args.jti}" if args.jti else f"tokens of {args.user} issued before {before:.0f}"
    print(f"revoked {what} in {path} ({len(revoked.tokens)} tokens, {len(revoked.users)} users)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from callgate import audit_cli

    return audit_cli.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": _serve,
        "token": _token,
        "check-config": _check_config,
        "revoke": _revoke,
        "audit": _audit,
        "demo": _demo,
        "admin": _admin,
    }
    # A worker of `serve --workers` says which one failed.
    said = "callgate" if getattr(args, "worker", None) is None else f"callgate worker {args.worker}"
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"{said}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{said}: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # A start-up failure raised inside trio.run arrives wrapped by each nursery on its way.
        failure = _start_up_failure(group)
        if failure is None:
            raise
        print(f"{said}: {failure}", file=sys.stderr)
        return 2


def _start_up_failure(group: BaseExceptionGroup[BaseException]) -> ConfigError | None:
    """The ConfigError in trio's nested ExceptionGroups, when it is the only failure in them
    (the Cancelled of the tasks it stopped aside); anything else keeps its traceback."""
    configs, rest = group.split(ConfigError)
    if rest is not None:
        _, rest = rest.split(trio.Cancelled)
    if configs is None or rest is not None:
        return None
    failure: BaseException = configs
    while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
        failure = failure.exceptions[0]
    return failure if isinstance(failure, ConfigError) else None
