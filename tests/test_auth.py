"""The admin guard and API keys (pure logic; the e2e tests drive them through HTTP)."""

from __future__ import annotations

import hashlib

import pytest

from ruvllm.deployments import auth
from ruvllm.deployments.auth import ADMIN_TOKEN_HEADER, AdminGuard, ApiKeys
from conftest import status_of
from ruvllm.deployments.client_error import ClientError
from ruvllm.config import AppConfig, ConfigError

TOKEN = "a-long-enough-admin-token"
JSON = {"content-type": "application/json"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_admin_api_is_off_without_a_token():
    guard = AdminGuard(None)
    assert not guard.enabled
    for headers in ({}, {"authorization": "Bearer anything", **JSON}, {ADMIN_TOKEN_HEADER: ""}):
        assert status_of(lambda: guard.check(headers)) == 403
        assert status_of(lambda: guard.check(headers, json_body=True)) == 403


def test_admin_token_and_json_are_required():
    guard = AdminGuard(TOKEN)
    assert status_of(lambda: guard.check(JSON, json_body=True)) == 401
    assert status_of(lambda: guard.check({"authorization": "Bearer nope", **JSON})) == 403
    right = {"authorization": f"Bearer {TOKEN}"}
    # A cross-site form or text/plain POST (no CORS preflight) is refused.
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
        assert status_of(lambda: guard.check({**right, "content-type": media},
                                             json_body=True)) == 415
    assert status_of(lambda: guard.check(
        {**right, "content-type": "application/json; charset=utf-8"}, json_body=True)) is None
    assert status_of(lambda: guard.check(right)) is None  # GET / DELETE: no body
    assert status_of(lambda: guard.check({ADMIN_TOKEN_HEADER: TOKEN})) is None


def test_admin_token_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest",
                        lambda a, b: calls.append((a, b)) or real(a, b))
    AdminGuard(TOKEN).check({"authorization": f"Bearer {TOKEN}"})
    assert calls == [(TOKEN.encode(), TOKEN.encode())]


def test_api_keys_name_the_tenant_and_refuse_the_rest(monkeypatch):
    keys = ApiKeys({"team-a": [sha("key-a1"), sha("key-a2").upper()], "team-b": [sha("key-b")]},
                   None)
    assert keys.enabled
    assert keys.tenant_for("key-a1") == keys.tenant_for("key-a2") == "team-a"
    assert keys.tenant_for("key-b") == "team-b"
    assert keys.tenant_for("key-c") is None
    assert keys.tenant_for(None) is None and keys.tenant_for("") is None
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest",
                        lambda a, b: compared.append(b) or real(a, b))
    keys.tenant_for("key-a1")
    assert len(compared) == 3, "every stored digest is compared, a match or not"
    assert not ApiKeys({}, None).enabled


def test_api_keys_file_is_read_and_reloaded_when_it_changes(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"team-a: [{sha('key-a')}]\n")
    now = [0.0]
    keys = ApiKeys({"team-c": [sha("key-c")]}, path, recheck_s=5, clock=lambda: now[0])
    assert keys.tenant_for("key-a") == "team-a" and keys.tenant_for("key-c") == "team-c"
    path.write_text(f"team-b: [{sha('key-b')}]\n")
    assert keys.tenant_for("key-b") is None  # not re-checked before recheck_s
    now[0] = 6
    assert keys.tenant_for("key-b") == "team-b"
    assert keys.tenant_for("key-a") is None  # rotated out
    path.write_text("team-b: [not-a-digest]\n")
    now[0] = 12
    assert keys.tenant_for("key-b") == "team-b"  # a broken file keeps the last good keys


def test_api_keys_file_missing_or_bad_at_start_fails(tmp_path):
    with pytest.raises(OSError):
        ApiKeys({}, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("team-a: [abc]\n")
    with pytest.raises(ValueError, match="api_keys_file"):
        ApiKeys({}, bad)
    clash = tmp_path / "clash.yaml"
    clash.write_text(f"team-b: [{sha('k')}]\n")
    with pytest.raises(ValueError, match="team-a"):
        ApiKeys({"team-a": [sha("k")]}, clash)


@pytest.mark.parametrize("ingress,field", [
    ({"api_keys": {"t": ["abc"]}}, "ingress.api_keys.t.0"),
    ({"api_keys": {"t": [sha("k")], "u": [sha("k")]}}, "ingress"),
    ({"max_body_bytes": 10}, "ingress.max_body_bytes"),
])
def test_invalid_security_config_names_the_field(ingress, field):
    with pytest.raises(ConfigError) as e:
        AppConfig.from_args({"ingress": ingress})
    assert field in str(e.value)


def test_short_admin_token_is_refused():
    with pytest.raises(ConfigError, match="adapters.admin_token"):
        AppConfig.from_args({"adapters": {"admin_token": "short"}})
    assert AppConfig.from_args({"ingress": {"api_keys": {"t": [sha("k").upper()]}}}) \
        .ingress.api_keys == {"t": [sha("k")]}


def tenants_with(keys: ApiKeys):
    """The ingress's own tenant logic, without Serve around it."""
    from ruvllm.deployments.ingress.tenants import Tenants

    return Tenants(keys, AppConfig.from_args(None).admission.tenant_header)


def request(**headers):
    from starlette.requests import Request

    return Request({"type": "http", "headers": [(k.replace("_", "-").encode(), v.encode())
                                                for k, v in headers.items()]})


class Parsed:
    user = "chosen-by-client"


def test_with_keys_the_tenant_is_the_keys_never_the_clients_choice():
    tenants = tenants_with(ApiKeys({"team-a": [sha("key-a")]}, None))
    spoof = request(authorization="Bearer key-a", x_tenant_id="team-b")
    assert tenants.authenticate(spoof) == "team-a"
    for bad in (request(), request(authorization="Bearer key-b"), request(x_tenant_id="team-a")):
        with pytest.raises(ClientError) as e:
            tenants.authenticate(bad)
        assert e.value.status == 401


def test_without_keys_the_client_names_its_tenant_and_raw_keys_are_not_kept():
    tenants = tenants_with(ApiKeys({}, None))
    assert tenants.authenticate(request()) is None
    assert tenants.named_by_client(request(x_tenant_id="team-b"), Parsed()) == "team-b"
    hashed = tenants.named_by_client(request(authorization="Bearer secret"), Parsed())
    assert hashed.startswith("key:") and "secret" not in hashed
    assert tenants.named_by_client(request(), Parsed()) == "chosen-by-client"
