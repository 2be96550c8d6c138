"""`softserve serve` flags are generated from `Settings` (and client flags from `ClientSettings`), in process."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from softserve.cli import build_parser
from softserve.config import ClientSettings, Settings, add_settings_flags, settings_from_args

CONFIGURATION_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _serve_help() -> str:
    parser = argparse.ArgumentParser(prog="softserve serve")
    add_settings_flags(parser)
    return " ".join(parser.format_help().split())  # argparse wraps lines


def _sample(name: str, info) -> tuple[list[str], object]:
    """A command line for the field and the value Settings should get from it (not the default)."""
    annotation = str(info.annotation)
    if info.annotation is bool:
        return ([_flag(name)] if not info.default else ["--no-" + _flag(name)[2:]]), not info.default
    if "Literal" in annotation:
        choice = [c for c in info.annotation.__args__ if c != info.default][0]
        return [_flag(name), choice], choice
    if info.annotation is int:
        value = 3 if info.default in (None, 0) else info.default + 1
        return [_flag(name), str(value)], value
    if info.annotation is float:
        value = 0.5 if not info.default else info.default + 0.5
        return [_flag(name), str(value)], value
    return [_flag(name), "some-value"], "some-value"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_flag_with_its_description_env_and_default(name):
    info = Settings.model_fields[name]
    assert info.description, f"Settings.{name} needs a description (it is the flag's help)"
    text = _serve_help()
    assert _flag(name) in text
    assert " ".join(info.description.split()) in text
    assert f"SOFTSERVE_{name.upper()}" in text


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_flag_sets_its_setting(name):
    argv, value = _sample(name, Settings.model_fields[name])
    settings = settings_from_args(build_parser().parse_args(["serve", *argv]))
    assert getattr(settings, name) == value


def test_unset_flags_fall_back_to_the_environment_then_the_default(monkeypatch):
    monkeypatch.setenv("SOFTSERVE_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("SOFTSERVE_UI", "false")
    parse = build_parser().parse_args
    settings = settings_from_args(parse(["serve"]))
    assert settings.max_model_len == 512 and settings.ui is False and settings.port == Settings.model_fields["port"].default
    settings = settings_from_args(parse(["serve", "--max-model-len", "1024", "--ui"]))
    assert settings.max_model_len == 1024 and settings.ui is True  # a flag given wins over the environment


@pytest.mark.parametrize("argv,expected", [
    (["--no-ui"], {"ui": False}), (["--ui", "false"], {"ui": False}), (["--ui"], {"ui": True}),
    (["--json-logs", "false"], {"json_logs": False}), (["--no-json-logs"], {"json_logs": False}),
    (["--metrics-tenant-labels", "true"], {"metrics_tenant_labels": True}),
    (["--metrics-tenant-labels"], {"metrics_tenant_labels": True}),
])
def test_boolean_spellings(argv, expected):
    settings = settings_from_args(build_parser().parse_args(["serve", *argv]))
    assert {k: getattr(settings, k) for k in expected} == expected


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--dtype", "int8"], ["--ui", "maybe"], ["--port", "x"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
    assert f"error: argument {argv[0]}" in capsys.readouterr().err


def test_out_of_range_value_exits_with_the_field_named(capsys):
    from softserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-batch-size", "0"])
    assert "max_batch_size" in str(exc.value.code)


def test_a_new_field_gets_a_flag_with_no_other_edit():
    class MoreSettings(Settings):
        new_knob: int = Field(3, ge=1, description="a knob added later")
        new_mode: Literal["a", "b"] | None = Field(None, description="a mode added later")
        new_switch: bool = Field(False, description="a switch added later")

    parser = argparse.ArgumentParser()
    add_settings_flags(parser, MoreSettings)
    assert "a knob added later" in parser.format_help() and "{a,b}" in parser.format_help()
    settings = settings_from_args(parser.parse_args(["--new-knob", "7", "--new-mode", "b", "--new-switch"]), MoreSettings)
    assert (settings.new_knob, settings.new_mode, settings.new_switch) == (7, "b", True)


def test_a_field_without_a_command_line_type_is_an_error():
    class Odd(Settings):
        mapping: dict[str, int] = Field(default_factory=dict, description="no flag type")

    with pytest.raises(TypeError, match="Odd|mapping"):
        add_settings_flags(argparse.ArgumentParser(), Odd)


def test_configuration_doc_lists_every_flag():
    table = CONFIGURATION_DOC.read_text()
    missing = [_flag(name) for name in Settings.model_fields
               if f"`{_flag(name)}`" not in table and f"`--no-{_flag(name)[2:]}`" not in table]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_client_commands_read_url_and_key_from_client_settings(monkeypatch):
    monkeypatch.setenv("SOFTSERVE_URL", "http://10.0.0.1:9000")
    monkeypatch.setenv("SOFTSERVE_API_KEY", "sk-ss-test")
    monkeypatch.setenv("SOFTSERVE_API_KEYS", "/tmp/k.yaml")
    assert ClientSettings().url == "http://10.0.0.1:9000"
    parse = build_parser().parse_args
    for argv in (["prompts", "list"], ["eval", "--model", "m", "--data", "d.jsonl"]):
        args = parse(argv)
        assert (args.url, args.api_key) == ("http://10.0.0.1:9000", "sk-ss-test")
    assert parse(["keys", "add", "--tenant", "t"]).file == "/tmp/k.yaml"
    assert parse(["prompts", "--url", "http://h:1", "list"]).url == "http://h:1"


def test_engine_defaults_are_the_settings_defaults():
    from softserve.engine.config import EngineConfig, SchedulerConfig

    defaults = Settings()
    scheduler = SchedulerConfig()
    for name in ("max_batch_size", "max_queue", "max_prefill_tokens", "max_model_len"):
        assert getattr(scheduler, name) == getattr(defaults, name), name
    engine = EngineConfig()
    assert (engine.kv_prefix_cache_bytes, engine.kv_cache_bytes) == (defaults.kv_prefix_cache_bytes, defaults.kv_cache_bytes)


def test_tuning_defaults_are_one_set_for_the_cli_and_the_api():
    import dataclasses

    from softserve.service.tuning import TuningJobRequest
    from softserve.tuning.config import TuningConfig

    config = TuningConfig()
    api_fields = TuningJobRequest.model_fields
    shared = [f.name for f in dataclasses.fields(TuningConfig) if f.name in api_fields and f.name not in ("init", "result_prompt")]
    assert len(shared) >= 10
    for name in shared:
        assert api_fields[name].default == getattr(config, name), name
    tune = build_parser().parse_args(["tune", "--data", "d.jsonl", "--name", "n"])
    cli_names = {"lr": "learning_rate"}
    for flag in ("num_virtual_tokens", "steps", "lr", "batch_size", "warmup_steps", "lr_schedule", "weight_decay",
                 "eval_every", "early_stopping_patience", "max_length", "seed"):
        assert getattr(tune, flag) == getattr(config, cli_names.get(flag, flag)), flag
