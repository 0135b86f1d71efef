from __future__ import annotations

import pytest

from pdx.errors import LayoutError
from pdx.layout import KVDtype, KVLayout


def layout(**kw: object) -> KVLayout:
    base: dict[str, object] = dict(model_id="m", dtype="bf16", num_layers=32, num_kv_heads=8,
                                   head_size=128, block_size=16)
    return KVLayout(**{**base, **kw})  # type: ignore[arg-type]


def test_sizes_of_an_8b_model() -> None:
    lay = layout()
    assert lay.dtype is KVDtype.BF16
    assert lay.token_bytes() == 128 * 1024  # 128 KiB of KV per token, as FACTS.md says
    assert lay.chunk_bytes(256) == 32 * 2**20


def test_tp_head_ranges() -> None:
    assert layout(tp_size=2, tp_rank=1).head_range == (4, 8)
    assert layout(tp_size=2, tp_rank=1).token_bytes() == 64 * 1024
    # More ranks than KV heads: heads are replicated.
    assert layout(num_kv_heads=2, tp_size=4, tp_rank=3).head_range == (1, 2)


def test_round_trip_through_dict() -> None:
    lay = layout(tp_size=2, tp_rank=1)
    assert KVLayout.from_dict(lay.to_dict()) == lay
    assert KVLayout.from_dict(lay.to_dict()).fingerprint == lay.fingerprint


@pytest.mark.parametrize("bad", [dict(num_layers=0), dict(tp_rank=2, tp_size=2), dict(num_kv_heads=6, tp_size=4),
                                 dict(dtype="int4")])
def test_invalid_layouts(bad: dict[str, object]) -> None:
    with pytest.raises((LayoutError, ValueError)):
        layout(**bad)


def test_from_dict_with_unknown_field() -> None:
    with pytest.raises(LayoutError, match="bad layout"):
        KVLayout.from_dict({**layout().to_dict(), "colour": "red"})
