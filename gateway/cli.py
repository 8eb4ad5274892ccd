"""icap-gateway: serve, check config and rules, manage tenants and the register.

Each package adds its own subcommands through an ``add_commands(subparsers)``
function; a command's handler is stored as ``func`` and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from gateway.settings import ConfigErrors

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: embedded defaults)")


def _config_check(args: argparse.Namespace) -> int:
    from gateway.config import load_config

    try:
        load_config(args.file)
    except ConfigErrors as e:
        if args.json:
            print(json.dumps({"ok": False, "errors": [
                {"file": x.source, "key": x.key, "reason": x.reason} for x in e.errors]}))
        else:
            for err in e.errors:
                print(err, file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps({"ok": True}) if args.json else f"{args.file}: OK")
    return EXIT_OK


def _config_example(args: argparse.Namespace) -> int:
    from gateway.config import render_example

    sys.stdout.write(render_example())
    return EXIT_OK


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand; with ``command="serve"`` only that one: the other
    commands' modules (the register's, with SQLAlchemy and Alembic, the rules
    tools) would stay imported in the supervisor for its whole life, about
    40 MiB it never uses (a worker imports what it needs itself)."""
    parser = argparse.ArgumentParser(prog="icap-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from gateway.serve import add_commands as add_serve_commands

    add_serve_commands(sub)
    if command == "serve":
        return parser

    config = sub.add_parser("config", help="check a config file or print an example").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config.add_parser("check", help="report unknown keys and bad values (file, key, reason)")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(func=_config_check)
    example = config.add_parser("example", help="print a commented config file with every key and its default")
    example.set_defaults(func=_config_example)

    try:
        from gateway.scanning.commands import add_commands as add_rules_commands
    except ImportError:  # the scanner lands separately
        pass
    else:
        add_rules_commands(sub)
    try:
        from register.cli import add_commands as add_register_commands
    except ImportError:  # the register lands separately
        pass
    else:
        add_register_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
