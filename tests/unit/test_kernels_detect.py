"""detect_layout, and the CPU page layouts checked against vLLM's own reshape_and_cache op."""

from __future__ import annotations

import pytest
import torch

from pdx.errors import LayoutError
from pdx.kernels import detect_layout
from pdx.layout import KVDtype, KVLayout, MemoryLayout


@pytest.mark.parametrize(("shape", "backend", "kw", "want"), [
    ((100, 8, 16, 256), "FLASH_ATTN", {}, MemoryLayout.KV_CONCAT),
    ((100, 8, 16, 256), "flashinfer", {}, MemoryLayout.KV_CONCAT),
    ((2, 100, 16, 8, 128), "FLASH_ATTN", {}, MemoryLayout.NHD),
    ((2, 100, 8, 16, 128), "TRITON_ATTN", {}, MemoryLayout.HND),
    ((100, 8, 16, 256), "CPU_ATTN", {"cpu_isa": "vec"}, MemoryLayout.CPU_VEC),
    ((100, 8, 16, 256), "CPU_ATTN", {"cpu_isa": "vec16", "tensor_stride": (32768, 4096, 256, 1)},
     MemoryLayout.CPU_VEC),
    ((100, 8, 16, 256), "CPU_ATTN", {"cpu_isa": "amx", "kv_dtype": "bf16"}, MemoryLayout.CPU_AMX),
])
def test_known_layouts(shape: tuple[int, ...], backend: str, kw: dict[str, object], want: MemoryLayout) -> None:
    assert detect_layout(shape, backend, 8, 128, 16, **kw) is want  # type: ignore[arg-type]


@pytest.mark.parametrize(("shape", "backend", "kw", "match"), [
    ((100, 8, 16, 256), "CPU_ATTN", {}, "pass cpu_isa"),
    ((100, 8, 16, 256), "CPU_ATTN", {"cpu_isa": "neon"}, "ISA 'neon'"),
    ((100, 8, 16, 256), "CPU_ATTN", {"cpu_isa": "amx", "kv_dtype": "fp8_e4m3"}, "bf16 only"),
    ((100, 8, 16, 256), "CPU_ATTN", {"cpu_isa": "vec", "tensor_stride": (65536, 8192, 512, 1)}, "contiguous"),
    ((2, 100, 16, 8, 128), "CPU_ATTN", {"cpu_isa": "vec"}, "expected"),
    ((100, 8, 16, 128), "FLASH_ATTN", {}, "quantised or MLA"),
    ((2, 100, 16, 16, 128), "FLASH_ATTN", {}, "cannot tell"),
    ((2, 100, 7, 16, 128), "FLASH_ATTN", {}, "unknown KV tensor shape"),
    ((100, 8, 16, 256), "FLASHMLA", {}, "not supported"),
])
def test_unknown_layouts_are_errors(shape: tuple[int, ...], backend: str, kw: dict[str, object], match: str) -> None:
    heads = 16 if shape[3:4] == (16,) and len(shape) == 5 else 8
    with pytest.raises(LayoutError, match=match):
        detect_layout(shape, backend, heads, 128, 16, **kw)  # type: ignore[arg-type]


# --- against vLLM's CPU backend -----------------------------------------------------------------

vllm_cpu = pytest.importorskip("pdx.kernels.vllm_cpu")


def _vllm_cpu_available() -> bool:
    try:
        from vllm import _custom_ops  # noqa: F401
        return hasattr(torch.ops._C, "cpu_attn_reshape_and_cache")
    except Exception:
        return False


needs_vllm = pytest.mark.skipif(not _vllm_cpu_available(), reason="vLLM's CPU ops are not installed")

#: what vLLM's op says when its build has no kernel for an ISA/dtype on this CPU (AMX needs an Intel CPU
#: with AMX; fp8 caches need AVX-512 kernels): nothing pdx can check there.
_UNSUPPORTED = "Unsupported CPU attention configuration"


def _self_check(layout: KVLayout, isa: str) -> None:
    """``vllm_cpu.self_check``, skipping (with vLLM's reason) what vLLM cannot run on this CPU."""
    try:
        vllm_cpu.self_check(layout, isa)
    except LayoutError as exc:
        if _UNSUPPORTED in str(exc):
            pytest.skip(f"vLLM's CPU build cannot run ISA {isa!r} for {layout.dtype.value} on this CPU: {exc}")
        raise


@needs_vllm
@pytest.mark.parametrize(("dtype", "isa", "block", "dim"), [
    ("fp32", "vec", 128, 64), ("fp32", "vec", 32, 32), ("fp32", "vec16", 16, 80),
    ("bf16", "vec", 32, 128), ("fp16", "vec16", 16, 64),
    ("bf16", "amx", 32, 64), ("bf16", "amx", 128, 128),
    ("fp8_e4m3", "vec", 32, 64), ("fp8_e5m2", "vec", 64, 32),
])
def test_pack_reads_what_vllm_writes(dtype: str, isa: str, block: int, dim: int) -> None:
    layout = KVLayout("m", KVDtype(dtype), num_layers=2, num_kv_heads=4, head_size=dim, block_size=block, tp_size=2,
                      tp_rank=1, memory_layout=detect_layout((10, 2, block, 2 * dim), "CPU_ATTN", 2, dim, block,
                                                             cpu_isa=isa, kv_dtype=dtype))
    _self_check(layout, isa)


@needs_vllm
def test_self_check_catches_a_wrong_layout() -> None:
    layout = KVLayout("m", KVDtype.BF16, num_layers=1, num_kv_heads=2, head_size=32, block_size=32,
                      memory_layout=MemoryLayout.CPU_VEC)
    with pytest.raises(LayoutError, match="not laid out"):
        _self_check(layout, "amx")


@needs_vllm
def test_attention_isa_is_vllms_choice() -> None:
    assert vllm_cpu.attention_isa(torch.float32, 128, 64) in ("vec", "neon", "vsx", "vxe", "rvv")
    assert vllm_cpu.attention_isa(torch.float32, 16, 64) == "vec16"
