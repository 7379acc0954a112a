"""Load a `WorkerConfig` from a TOML file, `JETLEDGER_*` environment variables and flags.

Precedence: flags > environment > file > defaults. Every `WorkerConfig` field is a setting
with one TOML key (the field name), one variable (`JETLEDGER_` + upper-case name) and one
flag (`--field-name`, or the field's `metadata["flag"]`). A bad value raises `ConfigError`
naming the setting and where its value came from; the commands exit 2 on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SettingError, WorkerConfig
from .logs import configure_logging

__all__ = [
    "ENV_PREFIX",
    "SETTINGS",
    "ConfigError",
    "Setting",
    "add_setting_arguments",
    "load_config",
    "settings_table",
]

ENV_PREFIX = "JETLEDGER_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """A setting cannot be used; the message names it (and its source)."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    kind: type  # str, int, float, bool or Path
    optional: bool
    default: Any
    help: str
    flag: str
    env: str
    secret: bool

    def parse_text(self, text: str, source: str) -> Any:
        """A value given as text (environment, command line)."""
        if self.optional and text == "":
            return None
        if self.kind is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ConfigError(f"{self.name} (from {source}): {text!r} is not a boolean "
                              "(use true or false)")
        try:
            return self.kind(text)
        except ValueError:
            raise ConfigError(f"{self.name} (from {source}): {text!r} is not "
                              f"{_article(self.kind)}") from None

    def check_toml(self, value: Any, source: str) -> Any:
        """A value given in the TOML file: native types, strings for paths."""
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, int | float) and not isinstance(value, bool),
            str: isinstance(value, str),
            Path: isinstance(value, str),
        }[self.kind]
        if not ok:
            raise ConfigError(f"{self.name} (from {source}): {value!r} is not "
                              f"{_article(self.kind)}")
        return self.kind(value)


def _article(kind: type) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            Path: "a path"}[kind]


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(WorkerConfig)
    out = []
    for f in dataclasses.fields(WorkerConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        kind = next(a for a in args if a is not type(None)) if optional else hint
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(Setting(
            name=f.name, kind=kind, optional=optional, default=default,
            help=f.metadata.get("help", ""),
            flag=f.metadata.get("flag", "--" + f.name.replace("_", "-")),
            env=ENV_PREFIX + f.name.upper(), secret=bool(f.metadata.get("secret")),
        ))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _settings()
_BY_NAME = {s.name: s for s in SETTINGS}


def add_setting_arguments(
    parser: argparse.ArgumentParser, names: Iterable[str] | None = None
) -> None:
    """`--config FILE` plus one flag per setting (all, or `names`). Flags not given stay out
    of the namespace, so that the environment and the file can fill them in."""
    parser.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML settings file (env {ENV_PREFIX}CONFIG)")
    wanted = set(names) if names is not None else None
    for s in SETTINGS:
        if wanted is not None and s.name not in wanted:
            continue
        default = "unset" if s.default is None else ("***" if s.secret else s.default)
        help_text = f"{s.help} (default: {default}; env {s.env})"
        if s.kind is bool:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            # Raw text: parsed (and its errors reported) like environment values, exit 2.
            parser.add_argument(s.flag, dest=s.name, default=argparse.SUPPRESS,
                                metavar=s.name.upper(), help=help_text)


def command_config(
    args: argparse.Namespace, command: str, *, needs_url: bool = False
) -> WorkerConfig | None:
    """The prologue every `jetledger` worker-side command shares: load the settings and set up
    logging, or print what is wrong (naming the setting) and return None: exit code 2."""
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"jetledger {command}: {exc}", file=sys.stderr)
        return None
    configure_logging(cfg.log_level, cfg.log_format)
    if needs_url and cfg.nats_url is None:
        print(f"jetledger {command}: nats_url is not set (use --nats-url or "
              "JETLEDGER_NATS_URL)", file=sys.stderr)
        return None
    return cfg


def load_config(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> WorkerConfig:
    """Merge defaults < file < environment < flags < `overrides` into a checked config."""
    env = os.environ if environ is None else environ
    given = vars(args) if args is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config_file = given.get("config") or env.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        for name, value in _read_toml(Path(config_file)).items():
            values[name] = _BY_NAME[name].check_toml(value, f"{config_file}")
            sources[name] = str(config_file)
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = s.parse_text(env[s.env], s.env)
            sources[s.name] = s.env
    for s in SETTINGS:
        if s.name in given:
            raw = given[s.name]
            values[s.name] = raw if isinstance(raw, bool) else s.parse_text(raw, s.flag)
            sources[s.name] = s.flag
    values.update(overrides)
    try:
        return WorkerConfig(**values)
    except SettingError as exc:
        where = sources.get(exc.setting)
        suffix = f" (from {where})" if where else ""
        raise ConfigError(f"{exc.message}{suffix}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    # Settings may sit at the top level or in a [worker] table (room for other sections).
    table = doc.pop("worker", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [worker] must be a table")
    merged = {**doc, **table}
    unknown = sorted(set(merged) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                          "see docs/operations.md for the list")
    return merged


def settings_table() -> str:
    """The Markdown table of every setting, as docs/operations.md holds it."""
    rows = ["| setting (TOML key) | environment | flag | default | meaning |",
            "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = "unset" if s.default is None else s.default
        if isinstance(default, bool):
            default = str(default).lower()
        flag = f"{s.flag} / --no-{s.flag[2:]}" if s.kind is bool else s.flag
        rows.append(f"| `{s.name}` | `{s.env}` | `{flag}` | `{default}` | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # regenerate the table in docs/operations.md
    print(settings_table())
