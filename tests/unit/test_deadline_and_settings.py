"""Deadline arithmetic and settings parsing: pure functions, no model."""

from __future__ import annotations

import pytest

from phi2 import settings as settings_module
from phi2.generator import deadline_from


def test_deadline_is_the_budget_when_lambda_has_plenty_of_time():
    assert deadline_from(budget_s=25, remaining_s=900, margin_s=1.5, now=100.0) == 125.0


def test_deadline_leaves_the_margin_before_the_lambda_timeout():
    assert deadline_from(budget_s=25, remaining_s=10, margin_s=1.5, now=100.0) == 108.5


def test_deadline_is_never_in_the_past():
    assert deadline_from(budget_s=25, remaining_s=1, margin_s=1.5, now=100.0) == 100.0


@pytest.fixture
def fresh_settings(monkeypatch):
    settings_module.get_settings.cache_clear()
    yield monkeypatch
    settings_module.get_settings.cache_clear()


def test_settings_defaults_outside_lambda(fresh_settings):
    for name in ("MODEL_DIR", "GENERATION_BUDGET_SECONDS", "PRELOAD_MODEL", "AWS_LAMBDA_RUNTIME_API", "LOG_TEXT"):
        fresh_settings.delenv(name, raising=False)
    settings = settings_module.get_settings()
    assert settings.generation_budget_s == 25.0  # safely under API Gateway's 29 s
    assert settings.preload is False  # importing the handler in a test loads nothing
    assert settings.log_text is False


def test_settings_preload_inside_a_lambda_runtime_and_read_overrides(fresh_settings):
    fresh_settings.setenv("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
    fresh_settings.setenv("GENERATION_BUDGET_SECONDS", "12.5")
    fresh_settings.setenv("MODEL_DIR", "/models/x")
    settings = settings_module.get_settings()
    assert settings.preload is True
    assert settings.generation_budget_s == 12.5
    assert str(settings.model_dir) == "/models/x"


def test_settings_are_read_once(fresh_settings):
    first = settings_module.get_settings()
    fresh_settings.setenv("GENERATION_BUDGET_SECONDS", "3")
    assert settings_module.get_settings() is first
