"""The CacheBlend model handle (the ``vllm.general_plugins`` entry point)."""

from __future__ import annotations

import gc
import tomllib
from pathlib import Path

import pytest

from pdx.connector.blend import BlendUnsupported, handle


def test_entry_point_is_declared() -> None:
    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {"pdx_blend": "pdx.connector.blend.handle:register"}


def test_register_is_a_no_op_unless_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(handle.ENV_SWITCH, raising=False)
    handle.register()  # must not import vLLM nor register anything


def test_register_overrides_llama_when_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    from vllm import ModelRegistry

    monkeypatch.setenv(handle.ENV_SWITCH, "1")
    before = dict(ModelRegistry.models)
    try:
        handle.register()
        cls = ModelRegistry._try_load_model_cls("LlamaForCausalLM")
        assert cls is not None and cls.__name__ == "HandleLlamaForCausalLM"
    finally:
        ModelRegistry.models.clear()
        ModelRegistry.models.update(before)


def test_loaded_model_is_weak() -> None:
    class Model:
        pass

    m = Model()
    handle.record(m)
    assert handle.loaded_model() is m
    del m
    gc.collect()
    with pytest.raises(BlendUnsupported, match="PDX_BLEND_HANDLE=1"):
        handle.loaded_model()
