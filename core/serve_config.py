"""Reading a Ray Serve config file (`cluster.yaml`) and the ruvllm apps inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ruvllm.config import AppConfig, ConfigError

APP_IMPORT_PATH = "ruvllm.deployments.app:build_app"


def load_serve_config(path: Path | str) -> dict[str, Any]:
    """Parse and check a Serve config file against Ray Serve's own schema."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"not a valid Ray Serve config: {e}") from None
    return raw


def load_app_configs(path: Path | str) -> dict[str, AppConfig]:
    """Validated `AppConfig` of every application that uses ruvllm's app builder."""
    raw = load_serve_config(path)
    configs = {}
    for app in raw.get("applications", []):
        if app.get("import_path") == APP_IMPORT_PATH:
            name = app.get("name", "default")
            try:
                configs[name] = AppConfig.from_args(app.get("args"))
            except ConfigError as e:
                raise ConfigError(f"application {name!r}: {e}") from None
    if not configs:
        raise ConfigError(f"no application with import_path {APP_IMPORT_PATH!r}")
    return configs
