"""The `gateway` command: run, check, mock-upstream."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from gateway.budget.usage import GROUPS
from gateway.config.model import Settings
from gateway.errors import ConfigError
from gateway.log_output import configure_logging, stderr_handler
from gateway.observability.access_log import AccessLog

__all__ = ["main"]

log = logging.getLogger("gateway")
GC_YOUNG_THRESHOLD = 20_000   # allocations between collections of young objects (Python's default: 700)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: where `auth: none` is allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def command_access_log(enabled: bool) -> AccessLog:
    """The access log of `gateway run`: its lines go straight to the stderr handler when INFO is on."""
    handler = stderr_handler()
    logger = logging.getLogger("gateway.access")
    if handler is None or not logger.isEnabledFor(logging.INFO) or logger.handlers or not logger.propagate:
        return AccessLog(enabled, logger)   # someone configured logging otherwise: go through it
    return AccessLog(enabled, logger, sink=handler.write_line)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import create_app

    settings = run_settings(args)
    if settings is None:
        return 2
    server = settings.server
    if args.workers > 1:
        from gateway.workers import WorkerSpec, supervise
        return supervise(WorkerSpec(args.config, server.host, server.port, args.workers, args.log_level,
                                    args.with_mock), settings)
    peers = None
    if args.worker_index is not None:
        from gateway.peers import Peers
        from gateway.workers import worker_settings
        settings = worker_settings(settings, args.worker_index)
        if args.peer_dir:
            peers = Peers(args.peer_dir, args.worker_index, args.worker_count)
    from gateway.serving.listener import bind_or_explain
    sockets = bind_or_explain(server.host, server.port, reuse_port=args.reuse_port)
    if sockets is None:
        return 1
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    app = create_app(settings, config_path=args.config, access_log=command_access_log(settings.server.access_log),
                     peers=peers)
    app.on_startup.append(freeze_startup_heap)
    if args.with_mock:
        app.cleanup_ctx.append(mock_upstream_ctx(args.with_mock))
    from gateway.serving.server import run
    return run(app, settings, sockets, client_connection_cap(settings))


def run_settings(args: argparse.Namespace) -> Settings | None:
    """The config file's settings with the command line's host and port; None (said on stderr) when unusable."""
    from gateway.config.loader import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    host = args.host or settings.server.host
    if settings.server.auth == "none" and not is_loopback(host):
        print(f"{args.config}: server.auth: 'none' is only allowed on a loopback host, not {host}",
              file=sys.stderr)
        return None
    server = dataclasses.replace(settings.server, host=host, port=args.port or settings.server.port)
    return dataclasses.replace(settings, server=server)


def client_connection_cap(settings: Settings) -> int:
    """server.max_connections, lowered (with a warning) to what the open-file limit leaves for clients."""
    from gateway.serving.limits import connection_cap, raise_open_file_limit, reserved_files

    open_files = raise_open_file_limit()
    cap = connection_cap(settings, open_files)
    if cap < settings.server.max_connections:
        log.warning("server.max_connections %d lowered to %d: the open-file limit is %d and upstream and store "
                    "connections need up to %d; raise 'ulimit -n' to allow more", settings.server.max_connections,
                    cap, open_files, reserved_files(settings))
    return cap


async def freeze_startup_heap(_app: web.Application) -> None:
    """Keep what start-up made (modules, config, metrics) out of the garbage collector's walks, and walk less often.

    Those objects live as long as the process; without this every full collection walks them all again
    on the request path (the gateway's p99), and young collections run every few requests.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def mock_upstream_ctx(address: str):
    """Serve the bundled mock provider beside the gateway, for a first run without a provider account."""
    from gateway.mock_upstream import MockUpstream

    host, _, port = address.rpartition(":")

    async def serve(_app: web.Application):
        runner = web.AppRunner(MockUpstream().app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
        log.info("mock upstream listening on http://%s:%s/v1", host or "127.0.0.1", port)
        yield
        await runner.cleanup()

    return serve


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.config.loader import load_settings, summarize

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    print(summarize(settings))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from gateway.config.schema import schema_text

    sys.stdout.write(schema_text(args.kind))
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import run_mock

    run_mock(args.host, args.port)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.status_cli import run_status

    return run_status(args.url, args.key, args.policy)


def cmd_usage(args: argparse.Namespace) -> int:
    from gateway.usage_cli import run_usage

    return run_usage(args.url, args.key, args.since, args.until, args.group_by, args.csv)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, not {value}")
    return value


def add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`gateway run` and its options (the --worker-* and --peer-dir ones are set by the supervisor)."""
    run = sub.add_parser("run", help="serve the gateway")
    run.add_argument("--config", default="config.yaml")
    run.add_argument("--host")
    run.add_argument("--port", type=port_number)
    run.add_argument("--reuse-port", action="store_true", help="share the port with other processes")
    run.add_argument("--workers", type=positive_int, default=1, metavar="N",
                     help="serve with N processes sharing the port (SO_REUSEPORT) under one supervisor")
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    run.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)   # ditto
    run.add_argument("--peer-dir", help=argparse.SUPPRESS)   # ditto: where sibling workers answer (gateway.peers)
    run.add_argument("--with-mock", nargs="?", const="127.0.0.1:9000", metavar="HOST:PORT",
                     help="also serve the bundled mock provider (default 127.0.0.1:9000)")
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="LLM cost gateway")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    check = sub.add_parser("check", help="validate the configuration and print a summary")
    check.add_argument("--config", default="config.yaml")
    check.set_defaults(func=cmd_check)
    schema = sub.add_parser("schema", help="print the JSON Schema of config.yaml, a policy file or a pricing file")
    schema.add_argument("kind", nargs="?", default="config", choices=["config", "policy", "pricing"])
    schema.set_defaults(func=cmd_schema)
    status = sub.add_parser("status", help="how much budget is left, until when; provider breakers")
    status.add_argument("--url", default="http://127.0.0.1:8080")
    status.add_argument("--key", help="client or admin key (default: $GATEWAY_KEY)")
    status.add_argument("--policy")
    status.set_defaults(func=cmd_status)
    usage = sub.add_parser("usage", help="spend from the ledger per model, key, team, policy, provider, "
                                                "end user or session")
    usage.add_argument("--url", default="http://127.0.0.1:8080")
    usage.add_argument("--key", help="client or admin key (default: $GATEWAY_KEY)")
    usage.add_argument("--since", help="ISO 8601 or epoch seconds (default: start of this month, UTC)")
    usage.add_argument("--until", help="ISO 8601 or epoch seconds (default: now)")
    usage.add_argument("--group-by", default="model", choices=list(GROUPS))
    usage.add_argument("--csv", action="store_true", help="print CSV: a header row, then one row per group")
    usage.set_defaults(func=cmd_usage)
    mock = sub.add_parser("mock-upstream", help="serve the bundled OpenAI-compatible mock provider")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.set_defaults(func=cmd_mock_upstream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return args.func(args)
