"""CacheBlend gates on real vLLM (CPU): the blend pass with the engine's own modules.

One vLLM engine (offline, in a subprocess running ``blend_gate.py``) serves every gate:

* ``r = 1`` equals a full prefill: last-token log-probabilities match vLLM's own within float32
  noise, and the greedy tokens are vLLM's;
* a RoPE round trip with the engine's ``inv_freq`` has relative error <= 1e-6;
* segments in their original order with in-context KV at ``r = 0`` equal exact reuse, bit for bit;
* the blend pass alone (``r = 1``) matches a reference forward: its KV equals an exact forward's,
  and the logits equal transformers' forward of the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdx.model import BuiltModel

pytestmark = pytest.mark.e2e

GATE_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def gates(tiny_model: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("blend-gate")
    out = run / "gates.json"
    env = dict(os.environ)
    env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
        "VLLM_HOST_IP": "127.0.0.1", "VLLM_RPC_BASE_PATH": str(run), "VLLM_CACHE_ROOT": str(run / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(run / "inductor"), "TMPDIR": str(run), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    })
    script = Path(__file__).with_name("blend_gate.py")
    proc = subprocess.run([sys.executable, str(script), str(tiny_model.path), str(out)], env=env,
                          capture_output=True, text=True, timeout=GATE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_exact_forward_with_engine_modules_is_vllm(gates: dict[str, Any]) -> None:
    assert gates["exact_logprob_err"] < 1e-4, gates
    assert gates["exact_tokens"] == gates["vllm_tokens"], gates


def test_r1_equals_full_prefill(gates: dict[str, Any]) -> None:
    assert gates["r1_logits_rel_err"] < 1e-5, gates
    assert gates["r1_logprob_err"] < 1e-4, gates
    assert gates["r1_tokens"] == gates["vllm_tokens"], gates


def test_rope_round_trip(gates: dict[str, Any]) -> None:
    assert gates["rope_round_trip"] <= 1e-6, gates


def test_r0_in_context_equals_exact_reuse(gates: dict[str, Any]) -> None:
    assert gates["r0_in_context_bit_exact"] is True, gates
    # reordering really changes the KV: repair is needed
    assert gates["r0_reordered_kv_rel_err"] > 1e-4, gates


def test_blend_pass_matches_reference_forward(gates: dict[str, Any]) -> None:
    assert gates["r1_kv_rel_err"] < 1e-5, gates
    assert gates["hf_logits_rel_err_exact"] < 1e-4, gates
    assert gates["hf_logits_rel_err_r1"] < 1e-4, gates
