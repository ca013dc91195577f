"""OpenAI- and Anthropic-compatible HTTP endpoint: `create_app(engine)` (see app.py)."""
from __future__ import annotations

__all__ = ["create_app"]


def create_app(engine, model_name: str | None = None, api_key: str | None = None, allow_origins: tuple = ()):
    from k2mlx.server.app import create_app as _create_app

    return _create_app(engine, model_name=model_name, api_key=api_key, allow_origins=allow_origins)
