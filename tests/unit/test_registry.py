from __future__ import annotations

import sys

import pytest

from pdx.errors import BackendUnavailable, UnknownName
from pdx.registry import Registry


def test_unknown_name_lists_known() -> None:
    reg: Registry[object] = Registry("widget")
    reg.add("a", "json:dumps")
    reg.add("b", "json:loads")
    with pytest.raises(UnknownName, match="unknown widget 'c'; known: a, b"):
        reg.get("c")


def test_missing_dependency_names_install_command() -> None:
    reg: Registry[object] = Registry("transport")
    reg.add("ghost", "pdx_no_such_module:Thing", install="pip install ghost")
    with pytest.raises(BackendUnavailable, match="pip install ghost"):
        reg.get("ghost")
    assert reg.available() == []


def test_lazy_import() -> None:
    reg: Registry[object] = Registry("thing")
    reg.add("colorsys", "colorsys:rgb_to_hsv")
    sys.modules.pop("colorsys", None)
    assert "colorsys" not in sys.modules
    assert callable(reg.get("colorsys"))


def test_import_pdx_imports_no_optional_backend() -> None:
    import subprocess

    code = (
        "import sys, pdx, pdx.config, pdx.keys, pdx.layout, pdx.transport;"
        "bad = [m for m in ('nixl', 'ucxx', 'redis', 'torch', 'triton', 'vllm') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""
