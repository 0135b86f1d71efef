"""The Triton kernel's logic, run by Triton's interpreter on CPU tensors (no GPU needed).

The interpreter is chosen when a kernel is defined, so this runs in a subprocess with
``TRITON_INTERPRET=1``. It checks the same kernel the GPU runs, against the reference,
byte for byte; tests/gpu repeats it compiled on a real GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

SCRIPT = r"""
import sys
sys.path.insert(0, {here!r})
import torch
from hypothesis import given, settings, strategies as st
from kernel_cases import cases, make_caches, ints, spans_strategy
from pdx.kernels import pack_batch, unpack_batch, payload_bytes
from pdx.layout import MemoryLayout

AFFINE = [MemoryLayout.NHD, MemoryLayout.HND, MemoryLayout.KV_CONCAT, MemoryLayout.CPU_VEC]

@settings(max_examples=25, deadline=None, database=None)
@given(cases(AFFINE), st.integers(1, 3), st.data())
def check(case, n_chunks, data):
    lay = case.layout
    src = make_caches(lay, case.num_blocks, case.storage, case.seed)
    r0, r1 = lay.head_range
    h0 = data.draw(st.integers(r0, r1 - 1)); h1 = data.draw(st.integers(h0 + 1, r1))
    jobs = [case.spans] + [data.draw(spans_strategy(case.num_blocks, lay.block_size)) for _ in range(n_chunks - 1)]
    outs = {{}}
    for impl in ("reference", "triton"):
        bufs = [torch.zeros(payload_bytes(lay, sum(s[2] for s in j), (h0, h1)), dtype=torch.uint8) for j in jobs]
        pack_batch(src, lay, list(zip(jobs, bufs)), heads=(h0, h1), impl=impl)
        outs[impl] = bufs
    assert all(torch.equal(a, b) for a, b in zip(outs["reference"], outs["triton"]))
    # unpack the first chunk (heads h0..h1) into caches holding r0..r1
    res = []
    for impl in ("reference", "triton"):
        dst = make_caches(lay, case.num_blocks, case.storage, case.seed + 1)
        got = unpack_batch(dst, lay, [(outs["reference"][0], jobs[0])], chunk_heads=(h0, h1), impl=impl)
        assert got == (h0, h1)
        res.append([ints(d).clone() for d in dst])
    assert all(torch.equal(a, b) for a, b in zip(*res))

check()
print("interpreted triton == reference")
"""


def test_triton_kernel_logic_in_the_interpreter() -> None:
    here = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(here=here)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreted triton == reference" in proc.stdout
