"""config.values.toml_value: the one writer of TOML literals (run-configs, node.toml, --set, flwr --run-config)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from fedrag_app.config.values import parse_override, toml_lines, toml_value
from fedrag_app.core.errors import ConfigError

VALUES = {
    "a.path": "C:\\data\\wq",  # a bare f'"{v}"' (the old deploy/follow_run writer) made an invalid escape of this
    "a.quote": 'say "hi"',
    "a.newline": "two\nlines",
    "a.unicode": "Zürich",
    "a.int": -3,
    "a.float": 1e-05,
    "a.bool": False,
}


def test_toml_lines_round_trip_through_tomllib():
    assert tomllib.loads(toml_lines(VALUES)) == {"a": {k.split(".")[1]: v for k, v in VALUES.items()}}


@pytest.mark.parametrize("key", list(VALUES))
def test_set_override_reads_back_what_toml_value_wrote(key):
    assert parse_override(f"{key}={toml_value(VALUES[key], key)}") == (key, VALUES[key])


@pytest.mark.parametrize("bad", [[1, 2], None, float("nan"), float("inf"), {"x": 1}])
def test_non_flat_values_name_the_key(bad):
    with pytest.raises(ConfigError, match="'fed.x'"):
        toml_value(bad, "fed.x")


def test_flwr_run_config_items_parse_back():
    """`flwr run --run-config "k=v k2=v2"` (launch_run's items) reads the literals back unchanged."""
    from flwr.common.config import parse_config_args

    plain = {k: v for k, v in VALUES.items() if '"' not in str(v) and "\n" not in str(v)}
    items = " ".join(f"{k}={toml_value(v, k)}" for k, v in plain.items())
    assert parse_config_args([items]) == plain


def test_deploy_node_config_uses_the_same_writer(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
    from flower_commands import connection_toml, node_config_toml

    assert node_config_toml(VALUES) == toml_lines(VALUES)
    doc = tomllib.loads(connection_toml("prod", "link.example.org:8000", "C:\\ca.crt"))
    assert doc == {"superlink": {"prod": {"address": "link.example.org:8000", "root-certificates": "C:\\ca.crt"}}}
