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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icap-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from gateway.serve import add_commands as add_serve_commands

    add_serve_commands(sub)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
