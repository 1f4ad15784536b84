"""Service settings: sources and their precedence, validation, and the CLI's exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cli import main
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_defaults_are_valid(tmp_path: Path) -> None:
    settings = load_settings(model_repository=tmp_path)
    assert isinstance(settings, Settings)
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")
    assert settings.batching and settings.max_batch_size >= 1
    assert settings.admin_token is None
    assert not settings.allow_non_finite and not settings.access_log


def test_precedence_flag_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text(
        f"model_repository: {tmp_path}\nport: 9001\nmax_batch_size: 8\nhost: 0.0.0.0\n"
    )
    monkeypatch.setenv("GATED_PORT", "9002")
    monkeypatch.setenv("GATED_MAX_QUEUE_DELAY_MS", "7.5")
    settings = load_settings(config, host="127.0.0.2", port=None)
    assert settings.port == 9002  # env beats file
    assert settings.max_batch_size == 8  # file beats default
    assert settings.max_queue_delay_ms == 7.5
    assert settings.host == "127.0.0.2"  # flag beats file; None flags fall through


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("GATED_MAX_BATCH_SIZE", "0", "max_batch_size (GATED_MAX_BATCH_SIZE)"),
        ("GATED_DEVICE", "tpu", "device (GATED_DEVICE)"),
        ("GATED_DEFAULT_GATE_MODE", "sparse", "default_gate_mode"),
        ("GATED_DEFAULT_KEEP_RATIO", "1.5", "default_keep_ratio"),
        ("GATED_PORT", "http", "port (GATED_PORT)"),
    ],
)
def test_invalid_env_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings(model_repository=tmp_path)
    message = str(info.value)
    assert named in message and "\n" not in message


def test_unknown_file_key_and_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text("max_batchsize: 4\n")
    with pytest.raises(SettingsError, match="max_batchsize"):
        load_settings(config, model_repository=tmp_path)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    config.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(config)


def test_admin_token_blank_is_unset_and_short_is_refused_without_echo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATED_ADMIN_TOKEN", "  ")
    assert load_settings(model_repository=tmp_path).admin_token is None
    monkeypatch.setenv("GATED_ADMIN_TOKEN", "hunter2")
    with pytest.raises(SettingsError) as info:
        load_settings(model_repository=tmp_path)
    assert "admin_token" in str(info.value) and "hunter2" not in str(info.value)


def test_missing_repository_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="model_repository"):
        load_settings(model_repository=tmp_path / "nope")


def test_cli_serve_invalid_setting_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATED_MAX_QUEUE_SIZE", "-1")
    assert main(["serve", "--model-repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_queue_size (GATED_MAX_QUEUE_SIZE)" in err[0]


def test_cli_serve_empty_repository_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["serve", "--model-repository", str(tmp_path), "--port", "0", "--grpc-port", "0"]
    assert main(args) == 2
    assert "no model folders" in capsys.readouterr().err


def test_cli_serve_grpc_port_equal_to_the_rest_port_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["serve", "--model-repository", str(tmp_path), "--port", "9000", "--grpc-port", "9000"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grpc_port (9000) must differ from port" in err[0]


def test_a_request_must_fit_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATED_MAX_REQUEST_ROWS", "128")
    with pytest.raises(SettingsError, match=r"max_request_rows \(128\).*max_batch_rows \(64\)"):
        load_settings(model_repository=tmp_path)
    monkeypatch.setenv("GATED_MAX_BATCH_ROWS", "128")
    assert load_settings(model_repository=tmp_path).max_batch_rows == 128


@pytest.mark.parametrize(
    ("value", "expected"), [("0.5, 0.25", (0.25, 0.5)), ("[0.5, 1]", (0.5, 1.0)), ("1", (1.0,))]
)
def test_keep_ratios_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[float, ...]
) -> None:
    monkeypatch.setenv("GATED_KEEP_RATIOS", value)
    settings = load_settings(model_repository=tmp_path)
    assert settings.served_keep_ratios() == expected
    # The default keep ratio is always served too.
    with_default = load_settings(model_repository=tmp_path, default_keep_ratio=0.3)
    assert with_default.served_keep_ratios() == tuple(sorted({*expected, 0.3}))


@pytest.mark.parametrize("value", ["0.5,2", "half", "", "[0.5, 0]"])
def test_bad_keep_ratios_name_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("GATED_KEEP_RATIOS", value)
    with pytest.raises(SettingsError, match=r"keep_ratios.* \(GATED_KEEP_RATIOS\)"):
        load_settings(model_repository=tmp_path)
