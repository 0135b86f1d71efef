"""Tenants at the proxy: a tenant's key identifies it, its requests carry its cache_salt to both
workers, and cache-aware routing keys them apart (stand-in workers; the connector's side of the
salt is in test_connector_scheduler.py, real vLLM in tests/e2e/test_reuse.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pdx.config import CacheAwareConfig, ProxyConfig, TenantConfig, load_config
from pdx.errors import ConfigError
from pdx.scheduler.tokenizer import ByteTokenizer
from proxy.testing import Cluster

MODEL = "standin-model"
TENANTS = [TenantConfig(name="a", api_key="key-a", cache_salt="salt-a"),
           TenantConfig(name="b", api_key="key-b")]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _post(c: Cluster, key: str, **body: Any) -> httpx.Response:
    return httpx.post(c.url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2, **body},
                      headers=_auth(key), timeout=20)


def test_a_tenants_requests_carry_its_salt_to_both_workers() -> None:
    with Cluster(1, 1, api_key="plain", tenants=TENANTS) as c:
        assert _post(c, "key-a").status_code == 200
        assert _post(c, "key-a", cache_salt="chosen-by-the-client").status_code == 200  # overwritten
        assert _post(c, "key-b").status_code == 200
        assert _post(c, "plain").status_code == 200
        assert _post(c, "plain", cache_salt="mine").status_code == 200  # vLLM's own feature, for non-tenants
        salts = [r.body.get("cache_salt") for r in c.decode[0].received]
        assert salts == ["tenant:salt-a", "tenant:salt-a", "tenant:b", None, "mine"]
        assert [r.body.get("cache_salt") for r in c.prefill[0].received] == salts
        assert all("authorization" not in r.body for r in c.decode[0].received)
        # a duplicate key cannot carry another salt past the check in the raw bytes
        raw = b'{"model": "standin-model", "prompt": "x", "cache_salt": "tenant:b", "cache_salt": "mine"}'
        for key in ("key-a", "plain"):
            assert httpx.post(c.url + "/v1/completions", content=raw, timeout=20,
                              headers={**_auth(key), "Content-Type": "application/json"}).status_code == 200
            assert b"tenant:b" not in c.decode[0].received[-1].raw
        for key in ("", "key-c", "admin"):
            r = _post(c, key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(c.url + "/v1/models", headers=_auth("key-b")).status_code == 200
        assert len(c.decode[0].received) == 7  # the refused ones reached no worker


@pytest.mark.parametrize(("salt", "why"), [("tenant:salt-a", "reserved"), (7, "string"), ("", "string"),
                                           ("x" * 129, "string")])
def test_a_client_cannot_pick_a_tenants_salt(salt: object, why: str) -> None:
    with Cluster(1, 1, api_key="plain", tenants=TENANTS) as c:
        r = _post(c, "plain", cache_salt=salt)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "cache_salt" and why in err["message"]
        assert not c.prefill[0].received and not c.decode[0].received


def test_cache_aware_routing_keys_tenants_apart() -> None:
    cfg = CacheAwareConfig(chunk_tokens=16)
    prompt = "".join(chr(97 + i % 26) * 16 for i in range(8)) + "tail"
    with Cluster(2, 1, api_key="plain", tenants=TENANTS, policy="cache_aware", cache_aware=cfg,
                 tokenizer=ByteTokenizer()) as c:
        assert _post(c, "key-a", prompt=prompt).status_code == 200
        assert _post(c, "key-a", prompt=prompt).status_code == 200  # A's repeat: decode holds A's chunks
        assert c.metric("pdx_proxy_routes_total", reason="skip_prefill") == 1
        assert _post(c, "key-b", prompt=prompt).status_code == 200  # B's identical prompt: nothing cached
        assert _post(c, "plain", prompt=prompt).status_code == 200
        assert c.metric("pdx_proxy_routes_total", reason="skip_prefill") == 1
        assert c.metric("pdx_proxy_routes_total", reason="cache_miss") == 3
        assert "kv_transfer_params" in c.decode[0].received[-1].body  # prefilled, not skipped


@pytest.mark.parametrize(("tenants", "needle"), [
    ([{"name": "a", "api_key": "k1"}, {"name": "a", "api_key": "k2"}], "tenants[1].name"),
    ([{"name": "a", "api_key": "k1"}, {"name": "b", "api_key": "k1"}], "tenants[1].api_key"),
    ([{"name": "a", "api_key": "plain"}], "tenants[0].api_key"),
    ([{"name": "a", "api_key": ""}], "tenants[0].api_key"),
    ([{"name": "a", "api_key": "k1", "cache_salt": "x/y"}], "tenants[0].cache_salt"),
    ([{"name": "a", "api_key": "k1", "cache_salt": "s" * 122}], "tenants[0].cache_salt"),
    ([{"name": "a", "api_key": "k1", "cache_salt": "b"}, {"name": "b", "api_key": "k2"}], "another tenant's"),
    ([{"name": "a", "api_key": "k1", "salt": "b"}], "unknown key tenants[0].'salt'"),
])
def test_bad_tenant_configs_name_the_key(tenants: list[dict[str, str]], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ProxyConfig, data={"api_key": "plain", "tenants": tenants}, env={})
    assert needle in str(info.value)
