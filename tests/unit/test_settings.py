"""Settings parsing: pure functions, no model (deadlines: test_invocation.py)."""

from __future__ import annotations

import pytest

from phi2 import settings as settings_module


@pytest.fixture
def fresh_settings(monkeypatch):
    settings_module.get_settings.cache_clear()
    yield monkeypatch
    settings_module.get_settings.cache_clear()


def test_settings_defaults_outside_lambda(fresh_settings):
    for name in ("MODEL_DIR", "API_TIMEOUT_MS", "PRELOAD_MODEL", "AWS_LAMBDA_RUNTIME_API", "LOG_TEXT"):
        fresh_settings.delenv(name, raising=False)
    settings = settings_module.get_settings()
    assert settings.api_timeout_s == 29.0  # API Gateway's default integration timeout
    assert settings.preload is False  # importing the handler in a test loads nothing
    assert settings.log_text is False


def test_settings_preload_inside_a_lambda_runtime_and_read_overrides(fresh_settings):
    fresh_settings.setenv("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
    fresh_settings.setenv("API_TIMEOUT_MS", "12500")
    fresh_settings.setenv("MODEL_DIR", "/models/x")
    settings = settings_module.get_settings()
    assert settings.preload is True
    assert settings.api_timeout_s == 12.5
    assert str(settings.model_dir) == "/models/x"


def test_settings_are_read_once(fresh_settings):
    first = settings_module.get_settings()
    fresh_settings.setenv("API_TIMEOUT_MS", "3000")
    assert settings_module.get_settings() is first
