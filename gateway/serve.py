"""``icap-gateway serve``: run the gateway in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from twisted.logger import Logger

from gateway.settings import ConfigError, ConfigErrors

log = Logger()


def add_commands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the ICAP gateway",
        description="Run the ICAP gateway in the foreground until SIGTERM or SIGINT. "
        "SIGHUP reloads the rules, certificates and tenant policies; SIGUSR1 reopens the access log.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file (default: embedded defaults)")
    serve.add_argument("--listen", metavar="ENDPOINT", action="append",
                       help="ICAP listener, a Twisted endpoint string such as tcp:1344 (repeatable; "
                       "replaces [server] listen)")
    serve.add_argument("--rules", metavar="DIR", help="rules directory (replaces [scan] rules)")
    serve.add_argument("--database", metavar="URL", help="register database URL (replaces [register] database)")
    serve.add_argument("--metrics", metavar="ENDPOINT",
                       help="metrics listener endpoint (replaces [monitoring] metrics_listen)")
    serve.add_argument("--workers", metavar="N", type=int,
                       help="worker processes sharing the listener, 0: one per core (replaces [server] workers)")
    # Set by a supervising parent for its workers: inherited listening sockets.
    serve.add_argument("--worker-fds", metavar="FD:FAMILY,...", help=argparse.SUPPRESS)
    # Set by a supervising parent for its workers: the pipe connections are
    # handed down (gateway.handoff), and the listeners they come from (JSON).
    serve.add_argument("--handoff-fd", metavar="FD", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--handoff-listeners", metavar="JSON", help=argparse.SUPPRESS)
    # Set by a supervising parent: a pipe on which the worker says it is ready.
    serve.add_argument("--ready-fd", metavar="FD", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=run_serve)


def load_serve_config(args: argparse.Namespace) -> Any:
    """The config file plus command-line overrides, every value checked."""
    from gateway.config import load_config, parse_config, with_overrides
    from gateway.settings import endpoint

    config = load_config(args.config)
    errors = []
    for value in args.listen or []:
        reason = endpoint(value)
        if reason:
            errors.append(ConfigError("command line", "--listen", reason))
    if args.metrics is not None and endpoint(args.metrics):
        errors.append(ConfigError("command line", "--metrics", endpoint(args.metrics) or ""))
    if args.workers is not None and args.workers < 0:
        errors.append(ConfigError("command line", "--workers", "must not be negative"))
    if args.database is not None:
        try:  # the register section's own validator
            parse_config({"register": {"database": args.database}}, "command line")
        except ConfigErrors as e:
            errors.extend(ConfigError("command line", "--database", x.reason) for x in e.errors)
    if errors:
        raise ConfigErrors(errors)
    return with_overrides(
        config,
        server__listen=args.listen,
        server__workers=args.workers,
        scan__rules=args.rules,
        register__database=args.database,
        monitoring__metrics_listen=args.metrics,
    )


# Set in the environment of a gateway that started itself again (see run_serve).
RESTARTED_ENV = "ICAP_GATEWAY_RESTARTED"


def run_serve(args: argparse.Namespace) -> int:
    from gateway.reactor import install

    reactor = install()
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from gateway.scanning.engine import RulesError

    try:
        config = load_serve_config(args)
    except ConfigErrors as e:
        print(e, file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    from gateway.workers import worker_count

    count = worker_count(config)
    worker = args.worker_fds is not None or args.handoff_fd is not None
    if not worker and count > 1:
        # Before the worker's modules (the register, scanning, YARA...): the
        # supervisor never uses them, and imports cannot be undone.
        return run_supervisor(args, config, count)

    from gateway.alloc import tune_malloc, with_tcache

    if not worker and RESTARTED_ENV not in os.environ:
        # One process serves: start again with the thread cache YARA needs on
        # the reactor thread (gateway.alloc; glibc reads it only at start).
        # Same pid and arguments.  Once only, whatever the environment then
        # holds: a loader may drop GLIBC_TUNABLES (a binary with file
        # capabilities runs in secure mode), which must not loop.
        env = with_tcache(os.environ)
        if env is not None:
            env[RESTARTED_ENV] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, env)

    # Before the first body: in-memory bodies stay in the heap instead of
    # being unmapped and faulted back in every transaction (gateway.alloc).
    tune_malloc(config.server.body_memory_budget)

    from gateway.handoff import Handoff, parse_listeners_argument
    from gateway.policy import chain_sighup
    from gateway.service import build_gateway
    from gateway.workers import parse_worker_fds

    adopted = parse_worker_fds(args.worker_fds) if args.worker_fds else None
    handoff = None
    if args.handoff_fd is not None:
        handoff = Handoff(args.handoff_fd, parse_listeners_argument(args.handoff_listeners or "[]"))
    try:
        gateway = build_gateway(config, reactor, adopted=adopted, handoff=handoff)
    except RulesError as e:
        print(f"cannot load rules: {e}", file=sys.stderr)
        return 1
    except ConfigErrors as e:
        print(e, file=sys.stderr)
        return 2
    except Exception as e:  # the register refusing an old schema, a port in use...
        name = type(e).__name__
        if name in {"SchemaError", "RegisterError"}:
            print(f"register: {e}", file=sys.stderr)
            return 1
        raise

    exit_code = [0]

    def start() -> None:
        try:
            gateway.service.startService()
        except Exception as e:  # a listener that cannot bind
            print(f"cannot start: {e}", file=sys.stderr)
            exit_code[0] = 1
            reactor.stop()  # type: ignore[attr-defined]
            return
        # What was really bound or adopted: a worker's inherited socket, port 0's number.
        log.info("icap-gateway serving on {listen}, rules {rules} ({count} rules, version {version})",
                 listen=", ".join(gateway.service.listening()), rules=str(gateway.rules.loaded_from),
                 count=gateway.rules.rule_count, version=gateway.rules.version)
        if args.ready_fd is not None:
            tell_supervisor_ready(args.ready_fd, gateway.rules.version)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", gateway.service.stopService)  # type: ignore[attr-defined]
    if worker:
        # A worker: the parent owns the terminal; SIGINT goes to the whole
        # process group on Ctrl-C, and the parent stops us with SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    gateway.rules.install_sighup()
    gateway.tls.install_sighup(reactor)  # after the rules: it chains their handler
    gateway.policies.install_sighup(reactor)  # chains both: re-reads [tenants.NAME]
    for manager in gateway.rulesets.values():  # [rulesets]: each set reloads too
        chain_sighup(reactor, manager.reload)
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(gateway.reopen_logs))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return exit_code[0]


def tell_supervisor_ready(fd: int, version: str) -> None:
    """One line on the ready pipe: rules loaded, accepting (gateway.workers)."""
    import os

    try:
        os.write(fd, b"ready " + version.encode("ascii", "replace") + b"\n")
        os.close(fd)
    except OSError as e:  # the supervisor is gone: it will not count us anyway
        log.warn("cannot tell the supervisor we are ready: {error}", error=str(e))


def run_supervisor(args: argparse.Namespace, config: Any, count: int) -> int:
    """The parent of ``count`` workers (see gateway.workers)."""
    import subprocess

    from twisted.internet import reactor

    from gateway.config import resolve_path
    from gateway.workers import build_supervisor

    # Fail here, once, rather than in every worker; in a child process, as
    # compiled rules (100 MiB and more) would stay in the supervisor's heap.
    for directory in (config.scan.rules, *config.rulesets.values()):  # [rulesets] too
        check = subprocess.run(
            [sys.executable, "-m", "gateway", "rules", "check", str(resolve_path(directory, config))],
            capture_output=True, text=True,
        )
        if check.returncode != 0:
            print(f"cannot load rules: {check.stderr.strip() or check.stdout.strip()}", file=sys.stderr)
            return 1
    worker_argv = ["serve"]
    if args.config:
        worker_argv += ["--config", args.config]
    if args.rules:
        worker_argv += ["--rules", args.rules]
    if args.database:
        worker_argv += ["--database", args.database]
    try:
        service, supervisor = build_supervisor(config, reactor, worker_argv, count)
    except (OSError, ValueError) as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return 1
    exit_code = [0]

    def start() -> None:
        try:
            service.startService()
        except Exception as e:
            print(f"cannot start: {e}", file=sys.stderr)
            exit_code[0] = 1
            reactor.stop()  # type: ignore[attr-defined]
            return
        log.info("icap-gateway supervising {count} workers on {listen}", count=count,
                 listen=", ".join(supervisor.listening()))

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, lambda s, _f: reactor.callFromThread(supervisor.signal_workers, s))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return exit_code[0]
