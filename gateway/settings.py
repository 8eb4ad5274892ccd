"""Typed config sections read from TOML, with errors that name file, key and reason.

A section is a frozen dataclass whose fields carry their default and a line of
documentation (``setting(default, "doc")``).  ``load_section`` checks a TOML
table against it: unknown keys, wrong types and values a field's validator
refuses all become ``ConfigError("file: [section] key: reason")``.  Every
package declares its own section (``register.settings``, ...), and
``gateway.config`` puts them together, so a key is defined in one place only.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")
Validator = Callable[[Any], str | None]  # returns a reason when the value is bad


class ConfigError(ValueError):
    """A bad config value.  ``str()`` is the message an admin sees."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class ConfigErrors(ValueError):
    """Every problem found in one file, so an admin fixes them in one go."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def setting(
    default: Any,
    doc: str,
    *,
    validate: Validator | None = None,
    kind: Literal["plain", "size", "duration"] = "plain",
) -> Any:
    """Declare a config key: its default, its documentation, its checks.

    ``kind="size"`` accepts an integer of bytes or a string such as ``"64 MiB"``;
    ``kind="duration"`` accepts seconds or a string such as ``"90d"``, ``"5m"``.
    """
    meta = {"doc": doc, "validate": validate, "kind": kind}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or \"1 MiB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _QUANTITY.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size such as 1048576 or \"1 MiB\", got {value!r}")


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected seconds or a duration such as \"30s\", \"5m\", \"90d\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _QUANTITY.match(value)
        if m and m.group(2).lower() in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ValueError(f"expected seconds or a duration such as \"30s\", \"5m\", \"90d\", got {value!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "absent"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any) -> Any:
    """Return ``value`` as ``tp`` or raise ValueError with a reason."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(arg, value)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
        return [_coerce(get_args(tp)[0], v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {value!r}")
        return {str(k): _coerce(get_args(tp)[1], v) for k, v in value.items()}
    if tp is type(None):
        raise ValueError("expected no value")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ValueError(f"unsupported setting type {tp!r}")
    raise ValueError(f"expected {_type_name(tp)}, got {value!r}")


def load_section(cls: type[T], table: Any, source: str, section: str) -> tuple[T, list[ConfigError]]:
    """Build ``cls`` from a TOML table; returns the section and every error found.
    On an error the key keeps its default so checking can go on."""
    errors: list[ConfigError] = []
    if not isinstance(table, dict):
        return cls(), [ConfigError(source, f"[{section}]", "expected a table")]
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, raw in table.items():
        where = f"[{section}] {key}"
        f = fields.get(key)
        if f is None:
            known = ", ".join(sorted(fields))
            errors.append(ConfigError(source, where, f"unknown key (known keys: {known})"))
            continue
        kind = f.metadata.get("kind", "plain")
        try:
            if kind == "size":
                value: Any = parse_size(raw)
            elif kind == "duration":
                value = parse_duration(raw)
            else:
                value = _coerce(hints[key], raw)
            validate = f.metadata.get("validate")
            reason = validate(value) if validate else None
            if reason:
                raise ValueError(reason)
        except ValueError as e:
            errors.append(ConfigError(source, where, str(e)))
            continue
        values[key] = value
    return cls(**values), errors


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, doc) for each key of a section, for docs and examples."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append((f.name, default, f.metadata.get("doc", "")))
    return out


# --- reusable validators ---------------------------------------------------


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than zero"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def endpoint(value: Any) -> str | None:
    """A Twisted server endpoint string such as ``tcp:1344:interface=127.0.0.1``."""
    if not isinstance(value, str) or ":" not in value:
        return "expected a Twisted endpoint string such as \"tcp:1344:interface=127.0.0.1\""
    kind, _, rest = value.partition(":")
    if kind == "haproxy":  # PROXY protocol in front of one of the others (gateway/proxyprotocol.py)
        if rest.partition(":")[0] == "haproxy":
            return "haproxy: wraps one endpoint, not another haproxy: one"
        inner = endpoint(rest)
        return f"haproxy: {inner}" if inner else None
    if kind not in {"tcp", "tcp6", "unix", "ssl", "systemd"}:
        return f"unsupported endpoint type {kind!r} (use tcp, tcp6, unix, ssl or systemd, optionally after haproxy:)"
    return None
