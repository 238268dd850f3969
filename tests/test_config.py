"""AppConfig: one validated mapping from run-config keys, equal to pyproject's documented table."""

import tomllib
from pathlib import Path

import pytest

from fedrag_app.config.app_config import AppConfig, all_keys, flatten, parse_override
from fedrag_app.core.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_lists_every_key_at_the_dataclass_default():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    flat = flatten(table)
    assert sorted(flat) == sorted(all_keys())
    assert AppConfig.from_flat(flat) == AppConfig()


def test_flat_round_trip_is_identity():
    cfg = AppConfig.from_flat({"ralt.top-k": 3, "generator.lora-target-modules": "q_proj,k_proj,v_proj"})
    assert cfg.ralt.top_k == 3
    assert cfg.generator.lora_target_modules == ("q_proj", "k_proj", "v_proj")
    assert AppConfig.from_flat(cfg.to_flat()) == cfg


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"'lsr.retriever-temprature' is unknown \(did you mean 'lsr.retriever-temperature'\?\)"
    ):
        AppConfig.from_flat({"lsr.retriever-temprature": 0.1})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("ralt.top-k", "two", r"'ralt.top-k' = 'two' \(str\): expected int"),
        ("ralt.top-k", True, r"expected int"),
        ("fed.resume", 1, r"expected bool"),
        ("lsr.retriever-temperature", -1.0, r"'lsr.retriever-temperature' = -1.0: must be > 0"),
        ("train.mode", "rlat", r"'train.mode' = 'rlat': must be one of"),
        ("lsr.top-k", 1, r"at least 2 candidates"),
    ],
)
def test_ill_typed_or_out_of_range_value_names_key_and_value(key, value, message):
    with pytest.raises(ConfigError, match=message):
        AppConfig.from_flat({key: value})


def test_int_is_accepted_where_a_float_is_expected():
    assert AppConfig.from_flat({"ralt.learning-rate": 1}).ralt.learning_rate == 1.0


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[ralt]\ntop-k = 5\n[train]\nmode = "lsr"\n')
    cfg = AppConfig.from_toml(f, {"train.mode": "ralt"})
    assert (cfg.ralt.top_k, cfg.train.mode) == (5, "ralt")


def test_malformed_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[ralt\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        AppConfig.from_toml(f)


def test_override_parsing_reads_toml_values():
    assert parse_override("ralt.top-k=4") == ("ralt.top-k", 4)
    assert parse_override("fed.resume=true") == ("fed.resume", True)
    assert parse_override("store.path=/tmp/x") == ("store.path", "/tmp/x")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("ralt.top-k")
