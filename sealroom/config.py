"""Reading TOML configuration into validated values.

Components define frozen dataclasses for their configuration and build them with :class:`Table`,
which reads typed keys and raises :class:`~sealroom.errors.ConfigError` naming the file, the key
and what was expected. Nothing is read at import time.
"""

from __future__ import annotations

import builtins
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sealroom.errors import ConfigError

_MISSING = object()


def key_error(source: str, key: str, expected: str) -> ConfigError:
    """``"<source>: <key> must be <expected>"``, naming the file and the key in its details."""
    return ConfigError(f"{source}: {key} must be {expected}", details={"file": source, "key": key})


def check_keys(doc: Mapping[str, Any], known: set[str], *, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key of ``doc`` that is not in ``known`` (shown under ``prefix``)."""
    for key in doc:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key}; expected one of {', '.join(sorted(known))}",
                details={"file": source, "key": f"{prefix}{key}"},
            )


def parse_toml(text: str, *, source: str) -> dict[str, Any]:
    """The TOML document ``text`` (read from ``source``); every TOML file Sealroom reads is parsed
    here. Invalid TOML, and TOML nested too deeply to parse, raise ConfigError naming the file."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})", details={"file": source}) from None
    except RecursionError:
        raise ConfigError(
            f"{source}: arrays or tables nested too deeply to read; Sealroom's files need a few levels at most",
            details={"file": source},
        ) from None


def load_toml(path: Path, *, what: str = "configuration file") -> dict[str, Any]:
    """Read and parse the TOML file ``path`` (``what`` names it in the error when it is missing)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}", details={"file": str(path)}) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}", details={"file": str(path)}) from None
    return parse_toml(text, source=str(path))


class Table:
    """A TOML table with typed, validated access. ``prefix`` is the dotted path for messages."""

    def __init__(
        self,
        doc: Mapping[builtins.str, Any],
        *,
        source: builtins.str,
        prefix: builtins.str = "",
        base: Path | None = None,
    ):
        self.doc = doc
        self.source = source
        self.prefix = prefix
        self.base = base or Path(".")

    def key_error(self, key: builtins.str, expected: builtins.str) -> ConfigError:
        """The error for ``key`` of this table (its dotted path in the message): :func:`key_error`."""
        return key_error(self.source, f"{self.prefix}{key}", expected)

    def check_keys(self, allowed: set[builtins.str]) -> None:
        check_keys(self.doc, allowed, source=self.source, prefix=self.prefix)

    def table(self, key: builtins.str, *, required: builtins.bool = True) -> Table:
        value = self.doc.get(key, _MISSING)
        if value is _MISSING:
            if required:
                raise self.key_error(key, "a table")
            value = {}
        if not isinstance(value, Mapping):
            raise self.key_error(key, "a table")
        return Table(value, source=self.source, prefix=f"{self.prefix}{key}.", base=self.base)

    def tables(self, key: builtins.str) -> list[Table]:
        value = self.doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.key_error(key, f"an array of tables ([[{self.prefix}{key}]])")
        return [
            Table(v, source=self.source, prefix=f"{self.prefix}{key}[{i}].", base=self.base)
            for i, v in enumerate(value)
        ]

    def str(self, key: builtins.str, default: Any = _MISSING) -> builtins.str:
        value = self.doc.get(key, default)
        if value is _MISSING or not isinstance(value, builtins.str) or not value:
            raise self.key_error(key, "a non-empty string")
        return value

    def opt_str(self, key: builtins.str) -> builtins.str | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, builtins.str) or not value:
            raise self.key_error(key, "a non-empty string")
        return value

    def int(self, key: builtins.str, default: Any = _MISSING, *, minimum: builtins.int | None = None) -> builtins.int:
        value = self.doc.get(key, default)
        if value is _MISSING or not isinstance(value, builtins.int) or isinstance(value, builtins.bool):
            raise self.key_error(key, "an integer")
        if minimum is not None and value < minimum:
            raise self.key_error(key, f"an integer >= {minimum}")
        return value

    def float(
        self, key: builtins.str, default: Any = _MISSING, *, minimum: builtins.float | None = None
    ) -> builtins.float:
        value = self.doc.get(key, default)
        if (
            value is _MISSING
            or isinstance(value, builtins.bool)
            or not isinstance(value, builtins.int | builtins.float)
        ):
            raise self.key_error(key, "a number")
        if minimum is not None and value < minimum:
            raise self.key_error(key, f"a number >= {minimum}")
        return float(value)

    def bool(self, key: builtins.str, default: Any = _MISSING) -> builtins.bool:
        value = self.doc.get(key, default)
        if not isinstance(value, builtins.bool):
            raise self.key_error(key, "true or false")
        return value

    def path(self, key: builtins.str, default: Any = _MISSING) -> Path:
        value = self.doc.get(key, default)
        if value is _MISSING or not isinstance(value, builtins.str | Path) or not str(value):
            raise self.key_error(key, "a path")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def opt_path(self, key: builtins.str) -> Path | None:
        return self.path(key) if self.doc.get(key) is not None else None

    def choice(self, key: builtins.str, choices: tuple[builtins.str, ...], default: Any = _MISSING) -> builtins.str:
        value = self.doc.get(key, default)
        if value not in choices:
            raise self.key_error(key, f"one of {', '.join(choices)}")
        return value


def toml_key(key: str) -> str:
    """A TOML key: bare where it can be, quoted otherwise."""
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def toml_value(v: Any) -> str:
    """A TOML value (inline tables for mappings; ``None`` entries left out)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def toml_table(name: str, values: Mapping[str, Any], *, array: bool = False) -> str:
    """A ``[name]`` (or ``[[name]]``) table of ``values``; ``None`` values are left out."""
    head = f"[[{name}]]" if array else f"[{name}]"
    lines = [head] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def file_table(path: Path) -> Table:
    path = Path(path)
    return Table(load_toml(path), source=str(path), base=path.parent)
