"""How run-config keys and values are read, checked and written: field help, range checks, TOML flattening,
``key=value`` overrides, type coercion, TOML literals. app_config.py holds the
sections; this holds the rules they share."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from fedrag_app.core.errors import ConfigError


def _help(text: str, default: Any) -> Any:
    """A dataclass field whose help text travels with it (PEFT style)."""
    return field(default=default, metadata={"help": text})


def _one_of(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"run-config key '{section}.{_kebab(name)}' = {value!r}: must be one of {allowed}")


def _positive(section: str, name: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"run-config key '{section}.{_kebab(name)}' = {value!r}: must be {bound}")


def _fraction(section: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"run-config key '{section}.{_kebab(name)}' = {value!r}: must be in [0, 1]")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys (what Flower does to [tool.flwr.app.config])."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'ralt.top-k=4' -> ('ralt.top-k', 4); the value is read as TOML, falling back to a bare string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


def _coerce(where: str, raw: Any, type_name: Any) -> Any:
    """Check a run-config value against a field type; lists arrive as comma-separated strings."""
    type_name = str(type_name)
    if type_name == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
    elif type_name == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif type_name == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif type_name == "str":
        if isinstance(raw, str):
            return raw
    elif type_name.startswith("tuple"):
        if isinstance(raw, str):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
            return tuple(raw)
    else:  # pragma: no cover - a new field type was added without a rule here
        raise AssertionError(f"no coercion rule for type {type_name}")
    expected = "comma-separated string" if type_name.startswith("tuple") else type_name
    raise ConfigError(f"{where} = {raw!r} ({type(raw).__name__}): expected {expected}")


def check_federated(cfg: Any) -> None:
    """What a federated run (ServerApp, ClientApp) refuses: options only centralized training supports."""
    if cfg.retriever.train_context_encoder:
        raise ConfigError(
            "run-config key 'retriever.train-context-encoder' = true: only centralized training "
            "(`fedrag-app train`) re-indexes the store after LSR trains the context encoder; in a "
            "federated run every node's shard and the server's store would keep the old encoder's "
            "vectors. Set it to false, or train centralized"
        )


def toml_value(value: Any, key: str = "") -> str:
    """A config value as a TOML literal (strings JSON-escaped: a valid TOML basic string). Flat values only:
    Flower's run- and node-configs hold bools, ints, floats and strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    where = f"config key '{key}'" if key else "config value"
    raise ConfigError(f"{where} = {value!r}: expected a bool, int, finite float or string")


def toml_lines(items: Mapping[str, Any]) -> str:
    """``key = literal`` lines, one per item, in order: a flat TOML file (run-config, node-config)."""
    return "".join(f"{key} = {toml_value(value, key)}\n" for key, value in items.items())
