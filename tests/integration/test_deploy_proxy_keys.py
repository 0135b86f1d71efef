"""``pdx up``'s proxy enforces the keys the deployment hands it: the real ``pdx-proxy`` process,
started by ``Deployment`` exactly as ``pdx up`` does (no engine is needed for the checks)."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdx.config import load_config
from pdx.deploy.deployment import DeployConfig, Deployment

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def proxy_only(tmp_path: Path) -> Iterator[Deployment]:
    cfg = load_config(DeployConfig, data={
        "workdir": str(tmp_path), "served_model_name": "m", "proxy": {"port": 0, "policy": "least_loaded"},
        "workers": [{"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]}, env={})
    with Deployment(cfg, "keys") as dep:
        dep._prepare_credentials()
        dep._start_proxy(time.monotonic() + 60)
        yield dep
    assert dep.proxy_proc is None


def test_the_running_proxy_checks_the_api_key_and_the_admin_key(proxy_only: Deployment) -> None:
    dep = proxy_only
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    api = dep.api_headers
    admin = {"Authorization": f"Bearer {dep.admin_key}"}
    wrong = {"Authorization": "Bearer not-the-key"}
    for headers in ({}, wrong, admin):  # the admin key is not an API key either
        r = httpx.post(f"{dep.url}/v1/completions", json=body, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{dep.url}/v1/models", headers=headers, timeout=10).status_code == 401
    models = httpx.get(f"{dep.url}/v1/models", headers=api, timeout=10)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["m"]
    # with the key, the request gets past authentication (no worker is up: 503, not 401)
    assert httpx.post(f"{dep.url}/v1/completions", json=body, headers=api, timeout=30).status_code == 503

    for headers in ({}, wrong, api):  # a client's key cannot list or register workers
        assert httpx.get(f"{dep.url}/admin/workers", headers=headers, timeout=10).status_code == 401
        assert httpx.post(f"{dep.url}/admin/register", json={}, headers=headers, timeout=10).status_code == 401
    assert httpx.get(f"{dep.url}/admin/workers", headers=admin, timeout=10).status_code == 200


def test_the_keys_and_the_secret_are_owner_only(proxy_only: Deployment) -> None:
    for name in ("secret", "api_key", "proxy.yaml"):
        mode = stat.S_IMODE((proxy_only.workdir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
