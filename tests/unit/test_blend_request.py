"""The blend request format (``kv_transfer_params.pdx.blend``) and segment keys."""

from __future__ import annotations

import pytest

from pdx.connector.blend import BlendOptions, BlendRequestError, Policy
from pdx.connector.blend.request import anchor_id, blend_cache_salt, parse_blend, segment_key
from pdx.keys import chunk_keys


def test_parse_defaults_and_options() -> None:
    assert parse_blend(None, 100) is None
    assert parse_blend({"v": 2}, 100) is None
    req = parse_blend({"blend": {"segments": [[10, 40], [40, 90]]}}, 100)
    assert req is not None
    assert req.anchor == 10 and req.segments == ((10, 40), (40, 90)) and req.region_end == 90
    assert req.options == BlendOptions()
    req = parse_blend({"blend": {"segments": [[10, 40], [50, 60]], "anchor": 4, "recompute_ratio": 0.3,
                                 "check_layer": 2, "policy": "random", "seed": 7}}, 61)
    assert req is not None and req.anchor == 4
    assert req.options == BlendOptions(0.3, 2, Policy.RANDOM, 7)


@pytest.mark.parametrize(("blend", "match"), [
    ([], "must be an object"),
    ({"segments": []}, "non-empty list"),
    ({"segments": [[0, 10]], "extra": 1}, "unknown fields"),
    ({"segments": [[0, "10"]]}, r"segments\[0\]"),
    ({"segments": [[0, 10], [5, 20]]}, "overlaps"),
    ({"segments": [[10, 10]]}, "empty"),
    ({"segments": [[10, 20]], "anchor": 11}, "anchor"),
    ({"segments": [[10, 100]]}, "last token"),
    ({"segments": [[10, 20]], "recompute_ratio": 2}, "recompute_ratio"),
    ({"segments": [[10, 20]], "policy": "oracle"}, "unknown blend policy"),
    ({"segments": [[10, 20]], "seed": "x"}, "bad option"),
    ({"segments": [[i, i + 1] for i in range(65)]}, "at most 64"),
])
def test_parse_rejects_bad_requests(blend: object, match: str) -> None:
    with pytest.raises(BlendRequestError, match=match):
        parse_blend({"blend": blend}, 100)


def test_segment_keys() -> None:
    a, b = anchor_id([0, 5, 6]), anchor_id([0, 5, 7])
    assert a != b and len(a) == 16
    doc = list(range(300, 556))
    k = segment_key("fp", a, doc)
    assert k == segment_key("fp", a, list(doc))
    assert len({k, segment_key("fp", b, doc), segment_key("fp2", a, doc), segment_key("fp", a, doc, "t1"),
                segment_key("fp", a, doc[:-1])}) == 5
    # never equal to an exact chunk key of the same tokens
    assert k not in chunk_keys(doc, "fp", 256)
    assert blend_cache_salt("r1") != blend_cache_salt("r2")
    assert blend_cache_salt("r1", "tenant").startswith("tenant|")


def test_store_requests_and_segment_pieces() -> None:
    from pdx.connector.blend.request import segment_pieces

    req = parse_blend({"blend": {"segments": [[10, 300]], "store": True}}, 320)
    assert req is not None and req.store and req.anchor == 10
    assert parse_blend({"blend": {"segments": [[10, 300]]}}, 320).store is False  # type: ignore[union-attr]
    with pytest.raises(BlendRequestError, match="store"):
        parse_blend({"blend": {"segments": [[10, 300]], "store": 1}}, 320)
    with pytest.raises(BlendRequestError, match="exactly one segment"):
        parse_blend({"blend": {"segments": [[10, 100], [100, 300]], "store": True}}, 320)
    with pytest.raises(BlendRequestError, match="exactly one segment"):
        parse_blend({"blend": {"segments": [[20, 300]], "anchor": 10, "store": True}}, 320)
    key = segment_key("fp", anchor_id([1, 2]), [5, 6, 7])
    pieces = segment_pieces(key, 300, 128)
    assert [n for _, n in pieces] == [128, 128, 44]
    assert len({k for k, _ in pieces}) == 3 and key not in {k for k, _ in pieces}
    assert segment_pieces(key, 300, 128) == pieces
