"""Layer-wise P/D bookkeeping: the worker's per-layer pack and push (``PdxWorkerSide.save_layer``)
against a fake agent with the real kernels, the decode agent's staging table
(``pdx.agent.push.Staging``), the push target in ``kv_transfer_params`` and the proxy's switch."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from connector_fakes import FakeAgent

torch = pytest.importorskip("torch")

from pdx.agent.push import Staging  # noqa: E402
from pdx.agent.types import ReserveRow  # noqa: E402
from pdx.checksum import checksum  # noqa: E402
from pdx.connector.metadata import ChunkStore, StepPlan, StoreSpec  # noqa: E402
from pdx.connector.params import parse_request_params  # noqa: E402
from pdx.connector.worker import KernelCodec, PdxWorkerSide, WorkerSettings  # noqa: E402
from pdx.errors import AgentUnavailable, TransferParamsError  # noqa: E402
from pdx.kernels import pack, payload_bytes  # noqa: E402
from pdx.keys import chunk_keys  # noqa: E402
from pdx.layout import KVDtype, KVLayout, MemoryLayout  # noqa: E402

BS, CT, BLOCKS, LAYERS = 16, 32, 24, 3
LAYOUT = KVLayout(model_id="m", dtype=KVDtype.FP32, num_layers=LAYERS, num_kv_heads=2, head_size=32,
                  block_size=BS, memory_layout=MemoryLayout.CPU_VEC)
CHUNK = payload_bytes(LAYOUT, CT)
PER_LAYER = CHUNK // LAYERS
KEYS = chunk_keys(list(range(CT * 4)), LAYOUT.chunk_fingerprint, CT)
BLOCK_IDS = (3, 9, 4, 12, 5, 6, 7, 8)


@dataclass
class PushingAgent(FakeAgent):
    """A fake agent that also records pushes: each layer's bytes as they were when announced."""

    pushes: dict[int, dict[str, Any]] = field(default_factory=dict)
    refuse_push: bool = False

    def push_open(self, peer: str, request_id: str, keys: Sequence[bytes], offsets: Sequence[int],
                  nbytes: Sequence[int], num_layers: int, deadline_s: float | None = None,
                  timeout: float | None = None) -> int:
        self._call("push_open")
        if self.refuse_push:
            raise AgentUnavailable("no pushes today")
        pid = len(self.pushes) + 1
        self.pushes[pid] = {"peer": peer, "request": request_id, "keys": list(keys), "offsets": list(offsets),
                            "nbytes": list(nbytes), "layers": {}, "seal": None}
        return pid

    def push_layer(self, push_id: int, layer: int, timeout: float | None = None) -> bool:
        self._call("push_layer")
        p = self.pushes[push_id]
        assert layer not in p["layers"], "a layer is pushed once"
        p["layers"][layer] = [self.buf[o + layer * n // LAYERS:o + (layer + 1) * n // LAYERS].copy()
                              for o, n in zip(p["offsets"], p["nbytes"])]
        return True

    def push_seal(self, push_id: int, checksums: Sequence[int], num_tokens: Sequence[int],
                  timeout: float | None = None) -> bool:
        self._call("push_seal")
        self.pushes[push_id]["seal"] = (list(checksums), list(num_tokens))
        return True


def _caches(seed: int) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, 2, BS, 64, generator=g) for _ in range(LAYERS)]


def _worker(agent: FakeAgent, caches: list[Any]) -> PdxWorkerSide:
    return PdxWorkerSide(WorkerSettings(chunk_tokens=CT, block_size=BS, load_timeout_s=5.0), agent,
                         KernelCodec(caches, LAYOUT, "cpu"), agent.pool(), LAYOUT, CHUNK)


def _packed(caches: list[Any], i: int) -> np.ndarray:
    from pdx.kernels import spans_for_tokens

    out = np.zeros(CHUNK, dtype=np.uint8)
    pack(caches, LAYOUT, spans_for_tokens(list(BLOCK_IDS), BS, i * CT, CT), out, impl="reference")
    return out


def _plan(push: str, n: int = 3) -> StepPlan:
    return StepPlan(CT, BS, stores=[StoreSpec("req-1", BLOCK_IDS, tuple(ChunkStore(i, KEYS[i]) for i in range(n)),
                                              push=push)])


def test_each_layer_is_packed_and_pushed_as_it_is_saved_then_sealed_with_the_commit_checksums() -> None:
    caches = _caches(1)
    agent = PushingAgent(slab_size=CHUNK)
    w = _worker(agent, caches)
    plan = _plan("tcp://decode:1")
    for layer in range(LAYERS):
        w.save_layer(plan, layer)
        w.save_layer(plan, layer)  # a repeated call does not push twice
        (push,) = agent.pushes.values()
        assert sorted(push["layers"]) == list(range(layer + 1))
    w.store(plan)
    (push,) = agent.pushes.values()
    assert push["peer"] == "tcp://decode:1" and push["request"] == "req-1" and push["keys"] == KEYS[:3]
    for i in range(3):
        want = _packed(caches, i)
        for layer in range(LAYERS):  # the bytes pushed for a layer are that layer's range of the chunk
            assert np.array_equal(push["layers"][layer][i], want[layer * PER_LAYER:(layer + 1) * PER_LAYER])
        assert agent.chunks[KEYS[i]].checksum == checksum(want.data)
    assert push["seal"] == ([checksum(_packed(caches, i).data) for i in range(3)], [CT] * 3)
    assert w.stats.stored_chunks == 3 and w.stats.pushed_chunks == 3
    assert agent.calls.count("reserve") == 1  # the store reused the push's slabs
    w.close()


def test_layers_the_hook_missed_are_packed_and_pushed_by_the_store() -> None:
    caches = _caches(2)
    agent = PushingAgent(slab_size=CHUNK)
    w = _worker(agent, caches)
    plan = _plan("tcp://decode:1", n=2)
    w.save_layer(plan, 0)
    w.store(plan)
    (push,) = agent.pushes.values()
    assert sorted(push["layers"]) == list(range(LAYERS)) and push["seal"] is not None
    for i in range(2):
        assert agent.chunks[KEYS[i]].checksum == checksum(_packed(caches, i).data)
    w.close()


def test_a_push_that_cannot_start_still_stores_bit_exact() -> None:
    caches = _caches(3)
    agent = PushingAgent(slab_size=CHUNK, refuse_push=True)
    w = _worker(agent, caches)
    plan = _plan("tcp://decode:1")
    for layer in range(LAYERS):
        w.save_layer(plan, layer)
    w.store(plan)
    assert not agent.pushes and w.stats.push_errors == 1
    assert "push_layer" not in agent.calls and "push_seal" not in agent.calls
    for i in range(3):
        assert agent.chunks[KEYS[i]].checksum == checksum(_packed(caches, i).data)
    w.close()


def test_without_a_push_target_nothing_happens_per_layer() -> None:
    agent = PushingAgent(slab_size=CHUNK)
    w = _worker(agent, _caches(4))
    plan = _plan("")
    for layer in range(LAYERS):
        w.save_layer(plan, layer)
    assert agent.calls == []
    w.store(plan)
    assert not agent.pushes and w.stats.stored_chunks == 3
    w.close()


def test_a_step_that_never_reached_its_store_gives_its_slabs_back() -> None:
    agent = PushingAgent(slab_size=CHUNK)
    w = _worker(agent, _caches(5))
    w.save_layer(_plan("tcp://decode:1"), 0)
    assert len(agent.reserved) == 3
    w.save_layer(_plan("tcp://decode:1"), 0)  # the next step's plan
    assert len(agent.reserved) == 3 and "abort" in agent.calls
    w.close()
    assert not agent.reserved


# --- the decode side's staging table ----------------------------------------------------------------


class _Settled:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, bool]] = []

    def __call__(self, session: Any, rid: int, abort: bool) -> None:
        self.calls.append((session, rid, abort))


def _rows(*ids: int) -> list[ReserveRow]:
    return [ReserveRow(i, 4096 * i, 4096) if i else ReserveRow(0) for i in ids]


def test_a_sealed_stage_is_taken_once_with_its_checksums() -> None:
    settled = _Settled()
    st = Staging(settled)
    k = [bytes([i]) * 16 for i in range(3)]
    st.add("tcp://p:1", "req", k, _rows(1, 2, 0), ttl_s=30, session="S")
    assert st.seal("tcp://p:1", "req", [1, 2], [11, 22], [32, 32]) == 2
    assert st.take("tcp://p:2", "req", k, wait_s=0) == []  # another peer's stage is not this one
    assert st.take("tcp://p:1", "other", k, wait_s=0) == []  # nor another request's
    got = st.take("tcp://p:1", "req", k[:1], wait_s=0)
    assert got == [(k[0], 1, 11, 32)]
    # the taken slab's grant ends (the fetch commits it); the sealed one not asked for is aborted
    assert sorted(settled.calls, key=lambda c: c[1]) == [("S", 1, False), ("S", 2, True)]
    assert st.take("tcp://p:1", "req", k, wait_s=0) == [] and len(st) == 0


def test_an_unsealed_stage_is_waited_for_then_left_to_expire() -> None:
    settled = _Settled()
    st = Staging(settled)
    k = [b"a" * 16]
    st.add("p", "req", k, _rows(5), ttl_s=30, session="S")
    assert st.take("p", "req", k, wait_s=0.05) == []
    assert settled.calls == [("S", 5, False)]  # writes may still land: not aborted, its grant ends


def test_take_wakes_up_on_the_seal() -> None:
    st = Staging(_Settled())
    k = [b"b" * 16]
    st.add("p", "req", k, _rows(7), ttl_s=30)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.extend(st.take("p", "req", k, wait_s=10)))
    t.start()
    st.seal("p", "req", [7], [77], [16])
    t.join(10)
    assert got == [(k[0], 7, 77, 16)]


def test_a_request_prefilled_in_two_steps_is_sealed_once_both_pushes_are() -> None:
    st = Staging(_Settled())
    k = [bytes([i]) * 16 for i in range(2)]
    st.add("p", "req", k[:1], _rows(1), ttl_s=30)  # step 1's push
    st.add("p", "req", k[1:], _rows(2), ttl_s=30)  # step 2's push, staged before step 1's seal
    st.seal("p", "req", [1], [11], [16])
    assert st.take("p", "req", k, wait_s=0.05) == [(k[0], 1, 11, 16)]  # step 2 unsealed: not taken
    st.add("p", "r2", k[:1], _rows(3), ttl_s=30)
    st.add("p", "r2", k[1:], _rows(4), ttl_s=30)
    st.seal("p", "r2", [3], [33], [16])
    st.seal("p", "r2", [4], [44], [16])
    assert st.take("p", "r2", k, wait_s=0) == [(k[0], 3, 33, 16), (k[1], 4, 44, 16)]


def test_expired_stages_are_forgotten() -> None:
    now = [100.0]
    st = Staging(_Settled(), clock=lambda: now[0])
    st.add("p", "req", [b"c" * 16], _rows(3), ttl_s=5)
    now[0] += 6
    assert st.sweep() == 1 and len(st) == 0


# --- params and the proxy's switch --------------------------------------------------------------


def test_push_target_travels_in_the_pdx_block() -> None:
    p = parse_request_params({"do_remote_decode": True, "pdx": {"v": 2, "push": {"agent": "tcp://d:1"}}})
    assert p.remote_decode and p.push == "tcp://d:1"
    both = parse_request_params({"do_remote_decode": True, "pdx": {
        "v": 2, "push": {"agent": "tcp://d:1"}, "hint": {"agent": "tcp://h:1", "chunks": 2}}})
    assert both.push == "tcp://d:1" and both.hint is not None and both.hint.chunks == 2
    for bad in ({"agent": ""}, {"agent": 5}, {"agent": "x", "more": 1}, "tcp://d:1"):
        with pytest.raises(TransferParamsError, match="push"):
            parse_request_params({"do_remote_decode": True, "pdx": {"v": 2, "push": bad}})
    with pytest.raises(TransferParamsError):
        parse_request_params({"do_remote_decode": True, "pdx": {"v": 2, "push": {"agent": "a"}, "x": 1}})
