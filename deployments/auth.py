"""Who may call what: the admin token guarding the adapter API (and the X-LoRA debug
field), and the API keys that authenticate OpenAI requests and name their tenant.

Secrets are compared in constant time (`hmac.compare_digest`). API keys are never kept
in clear: the config and the keys file hold their sha256 hex digests, and a presented
key is hashed and compared against every digest, so neither a key nor a digest leaks
through timing. The keys file (a mounted Kubernetes Secret) is re-read when it changes,
so keys rotate without a restart; a file that stops parsing keeps the last good keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from pydantic import TypeAdapter, ValidationError

from ruvllm.deployments.client_error import ClientError
from ruvllm.config import AppConfig, Sha256Hex, check_api_keys

logger = logging.getLogger("ray.serve")

ADMIN_TOKEN_ENV = "RUVLLM_ADMIN_TOKEN"
# Where the admin token goes on OpenAI routes when API keys hold the Authorization header.
ADMIN_TOKEN_HEADER = "x-ruvllm-admin-token"
_KEYS = TypeAdapter(dict[str, list[Sha256Hex]])


def bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def admin_token(config: AppConfig) -> str | None:
    return config.adapters.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None


class AdminGuard:
    """The admin API is off without a token; with one it wants the token and JSON."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, headers: Mapping[str, str], *, json_body: bool = False,
              what: str = "the admin API") -> None:
        if self._token is None:
            raise ClientError(403, f"{what} is off: no admin token is configured "
                              f"(adapters.admin_token or ${ADMIN_TOKEN_ENV})")
        given = headers.get(ADMIN_TOKEN_HEADER) or bearer(headers)
        if given is None:
            raise ClientError(401, f"{what}: missing admin token (Authorization: Bearer, "
                              f"or {ADMIN_TOKEN_HEADER})")
        if not hmac.compare_digest(given.encode(), self._token):
            raise ClientError(403, f"{what}: wrong admin token")
        if json_body and _media_type(headers) != "application/json":
            # A web page can make a browser POST cross-site without a CORS preflight
            # only as a form or text/plain; JSON-only shuts that door even where
            # something in front (a proxy, an ingress controller) adds the token.
            raise ClientError(415, f"{what}: the body must be JSON "
                              "(content-type: application/json)")


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


class ApiKeys:
    """sha256 digests of API keys by tenant, from the config and an optional file."""

    def __init__(self, configured: dict[str, list[str]], path: Path | None,
                 recheck_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._configured = configured
        self._path = Path(path).expanduser() if path else None
        self._recheck_s = recheck_s
        self._clock = clock
        self._checked_at = clock()
        self._stamp: Any = None
        self._entries: list[tuple[bytes, str]] = []
        file_keys = self._read_file() if self._path else {}
        self._set(file_keys)

    @property
    def enabled(self) -> bool:
        return self._path is not None or bool(self._entries)

    def tenant_for(self, key: str | None) -> str | None:
        """The key's tenant, or None for a missing or unknown key."""
        self._maybe_reload()
        if not key:
            return None
        given = digest(key).encode()
        found = None
        for stored, tenant in self._entries:  # every entry, match or not: constant time
            if hmac.compare_digest(given, stored) and found is None:
                found = tenant
        return found

    def _set(self, file_keys: dict[str, list[str]]) -> None:
        merged: dict[str, list[str]] = {}
        for source in (self._configured, file_keys):
            for tenant, digests in source.items():
                merged.setdefault(tenant, []).extend(digests)
        merged = _KEYS.validate_python(merged)  # lower-case hex, whatever the source
        check_api_keys(merged)
        self._entries = [(d.encode(), t) for t, ds in merged.items() for d in ds]

    def _read_file(self) -> dict[str, list[str]]:
        """Raises ValueError/OSError: at start, a missing or bad file stops the ingress."""
        assert self._path is not None
        stat = self._path.stat()
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        try:
            return _KEYS.validate_python(yaml.safe_load(self._path.read_text()) or {})
        except (ValidationError, yaml.YAMLError) as e:
            raise ValueError(f"ingress.api_keys_file {self._path}: {e}") from None

    def _maybe_reload(self) -> None:
        if self._path is None or self._clock() - self._checked_at < self._recheck_s:
            return
        self._checked_at = self._clock()
        try:
            stat = self._path.stat()
            if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._stamp:
                return
            self._set(self._read_file())
            logger.info("API keys reloaded from %s", self._path)
        except (OSError, ValueError) as e:
            logger.error("API keys file unusable, keeping the previous keys: %s", e)
