"""The pdx ``kv_transfer_params`` schema: round trip and clear errors for bad input."""

from __future__ import annotations

from typing import Any

import pytest

from pdx.connector.params import (
    PARAMS_VERSION,
    RemotePrefill,
    parse_request_params,
    response_params,
)
from pdx.errors import TransferParamsError, WireError
from pdx.keys import ChunkKey, chunk_keys


def _remote(**over: Any) -> RemotePrefill:
    keys = tuple(chunk_keys(list(range(512)), "fp", 128))
    fields: dict[str, Any] = dict(agent="tcp://127.0.0.1:5000", fingerprint="fp", chunk_tokens=128,
                                  num_tokens=512, keys=keys, namespace="ns", request_id="r1", lease_s=30.0)
    fields.update(over)
    return RemotePrefill(**fields)


def test_response_params_round_trip() -> None:
    remote = _remote()
    raw = response_params(remote)
    assert raw["do_remote_prefill"] is True and raw["do_remote_decode"] is False
    parsed = parse_request_params(raw)
    assert parsed.remote == remote
    assert parsed.remote is not None and len(parsed.remote.keys) == 4
    assert not parsed.remote_decode


def test_absent_and_foreign_params() -> None:
    assert parse_request_params(None).remote is None
    p = parse_request_params({"do_remote_decode": True, "other_connector": {"x": 1}})
    assert p.remote_decode and p.remote is None


def _bad(raw: object, match: str) -> None:
    with pytest.raises(TransferParamsError, match=match) as info:
        parse_request_params(raw)
    assert isinstance(info.value, WireError)


def _with(**pdx: Any) -> dict[str, Any]:
    block = _remote().to_dict()
    for k, v in pdx.items():
        if v is _DROP:
            block.pop(k)
        else:
            block[k] = v
    return {"do_remote_prefill": True, "pdx": block}


_DROP = object()


@pytest.mark.parametrize(("raw", "match"), [
    ("nope", "expected an object"),
    ({"do_remote_prefill": "yes"}, "do_remote_prefill: expected true or false"),
    ({"do_remote_prefill": True}, "no 'pdx' block"),
    ({"do_remote_prefill": True, "pdx": [1]}, "pdx: expected an object"),
    (_with(v=PARAMS_VERSION + 1), r"pdx\.v: this engine speaks version"),
    (_with(agent=_DROP), "missing required field `agent`"),
    (_with(agent=""), r"length >= 1 - at `\$\.agent`"),
    (_with(color="red"), "unknown field `color`"),
    (_with(chunk_tokens=0), r">= 1 - at `\$\.chunk_tokens`"),
    (_with(chunk_tokens="128"), r"Expected `int`, got `str` - at `\$\.chunk_tokens`"),
    (_with(num_tokens=-1), r">= 0 - at `\$\.num_tokens`"),
    (_with(num_tokens=600), "4 keys for 5 chunks"),
    (_with(v=1), r"pdx\.v: this engine speaks version 2, got 1"),
    (_with(keys=["zz"]), r"at `\$\.keys\[0\]`"),
    (_with(keys="abc"), r"Expected `array`, got `str` - at `\$\.keys`"),
    (_with(keys=[ChunkKey(b"\x01" * 16).hex()]), "1 keys for 4 chunks"),
    (_with(lease_s=-1), r"at `\$\.lease_s`"),
    (_with(fingerprint=7), r"at `\$\.fingerprint`"),
    (_with(agent="x" * 5000), r"length <= 1024 - at `\$\.agent`"),
    (_with(lease_s=1e300), r"<= 86400.0 - at `\$\.lease_s`"),
    (_with(lease_s=True), r"at `\$\.lease_s`"),
])
def test_bad_params_name_the_field(raw: object, match: str) -> None:
    _bad(raw, match)


def test_a_tail_chunk_counts_as_a_chunk() -> None:
    tail = ChunkKey(b"\x02" * 16)
    remote = _remote(num_tokens=512 + 77, keys=(*_remote().keys, tail))
    parsed = parse_request_params(response_params(remote)).remote
    assert parsed == remote and len(parsed.keys) == 5 and parsed.keys[-1] == tail


def test_keys_may_be_omitted() -> None:
    parsed = parse_request_params(_with(keys=_DROP))
    assert parsed.remote is not None and parsed.remote.keys == ()
