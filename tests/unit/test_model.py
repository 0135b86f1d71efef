"""The embedded model: deterministic bytes, atomic and lock-protected builds, lively greedy output."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdx.config import data_dir
from pdx.errors import ModelError
from pdx.model import PRESETS, BuiltModel, ModelSpec, ensure_model, load, model_path, preset, verify
from pdx.model import build as build_mod
from pdx.model import tokenizer as tok_mod
from pdx.model.spec import CPU_HEAD_SIZES

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return ensure_model("tiny", tmp_path_factory.mktemp("a"))


# --- spec --------------------------------------------------------------------------------------


def test_presets_fit_the_cpu_attention_backend() -> None:
    tiny, small = preset("tiny"), preset("small")
    for spec in PRESETS.values():
        assert spec.head_dim in CPU_HEAD_SIZES
        assert spec.max_position_embeddings >= 4096
    assert tiny.num_layers == 2 and tiny.hidden_size == 128
    assert small.num_layers >= 8 and 512 <= small.hidden_size <= 1024 and small.head_dim == 64
    assert 80e6 <= small.num_params() <= 150e6


def test_spec_validation_names_the_problem() -> None:
    base = preset("tiny")
    with pytest.raises(ModelError, match="head_dim 48"):
        dataclasses.replace(base, head_dim=48)
    with pytest.raises(ModelError, match="multiple of num_kv_heads"):
        dataclasses.replace(base, num_heads=3)
    with pytest.raises(ModelError, match="known: small, tiny"):
        preset("huge")
    with pytest.raises(ModelError, match="model name"):
        dataclasses.replace(base, name="../x")


def test_spec_hash_follows_every_field() -> None:
    tiny = preset("tiny")
    assert tiny.spec_hash() == ModelSpec(**tiny.to_dict()).spec_hash()
    assert tiny.spec_hash() != dataclasses.replace(tiny, seed=1).spec_hash()
    assert tiny.folder_name.startswith("tiny-")


def test_model_folder_follows_the_data_dir(tmp_path: Path) -> None:
    assert data_dir("/x/y") == Path("/x/y")
    assert data_dir("", env={"PDX_DATA_DIR": str(tmp_path)}) == tmp_path
    assert data_dir("", env={}) == Path.home() / ".cache" / "pdx"
    assert model_path("tiny", tmp_path) == tmp_path / "models" / preset("tiny").folder_name
    assert not model_path("tiny", tmp_path).exists()  # asking for the path builds nothing


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic() -> None:
    spec = preset("tiny")
    a = tok_mod.train(spec).to_str()
    b = tok_mod.train(spec).to_str()
    other = tok_mod.train(dataclasses.replace(spec, seed=5)).to_str()
    assert a == b
    assert a != other


def test_tokenizer_round_trips_any_text(built: BuiltModel) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built.path))
    assert len(tok) == built.vocab_size == preset("tiny").vocab_size
    text = "Prefill 1,500 tokens — then décode: naïve ✓ 😀 \n\ttabs"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|bos|><|user|>\nhi\n<|assistant|>\n"


# --- build ------------------------------------------------------------------------------------


def test_build_is_byte_for_byte_deterministic(built: BuiltModel, tmp_path: Path) -> None:
    again = ensure_model("tiny", tmp_path)
    assert again.path != built.path
    assert again.files == built.files
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(built.files)
    verify(again)


def test_built_folder_is_a_float32_llama(built: BuiltModel) -> None:
    cfg = json.loads((built.path / "config.json").read_text())
    spec = preset("tiny")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "float32"
    assert cfg["num_hidden_layers"] == spec.num_layers
    assert cfg["hidden_size"] == spec.hidden_size
    assert cfg["head_dim"] == spec.head_dim
    assert cfg["num_key_value_heads"] == spec.num_kv_heads
    assert cfg["vocab_size"] == built.vocab_size
    assert cfg["max_position_embeddings"] >= 4096
    assert cfg["tie_word_embeddings"] is False
    from safetensors import safe_open

    with safe_open(str(built.path / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}


def test_greedy_output_is_varied_and_context_dependent(built: BuiltModel) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pdx.model import paragraph

    tok = AutoTokenizer.from_pretrained(str(built.path))
    model = LlamaForCausalLM.from_pretrained(str(built.path), dtype=torch.float32).eval()
    ids = tok.encode(paragraph(11, 300), add_special_tokens=False)[:400]

    def greedy(prompt: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        return [int(t) for t in out[0, len(prompt):]]

    a = greedy(ids)
    assert len(set(a)) > 8, a  # not one token (or a short loop) repeated
    assert not set(a) & {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert greedy(ids) == a
    changed = list(ids)
    changed[3] = (changed[3] + 1) % 2000 + 3  # another ordinary token
    assert greedy(changed) != a  # an early token matters to the continuation


def test_verify_catches_a_changed_file(built: BuiltModel, tmp_path: Path) -> None:
    copy = tmp_path / built.path.name
    copy.mkdir()
    for name in built.files:
        (copy / name).write_bytes((built.path / name).read_bytes())
    (copy / build_mod.MANIFEST).write_bytes((built.path / build_mod.MANIFEST).read_bytes())
    verify(load(copy))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.safetensors"):
        verify(load(copy))


def test_a_folder_without_manifest_is_not_used(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a complete pdx model folder"):
        load(tmp_path)


def test_a_crashed_build_leaves_nothing_in_the_way(tmp_path: Path) -> None:
    final = model_path("tiny", tmp_path)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".tmp-{final.name}-99999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    final.mkdir()  # a folder without manifest, e.g. copied in by hand
    built = ensure_model("tiny", tmp_path)
    assert built.path == final
    verify(built)
    assert not stale.exists()


def test_lock_wait_has_a_deadline(tmp_path: Path) -> None:
    final = model_path("tiny", tmp_path)
    final.parent.mkdir(parents=True)
    with build_mod._FileLock(final.parent / f".{final.name}.lock", 1.0), \
            pytest.raises(ModelError, match="timed out"):
        ensure_model("tiny", tmp_path, lock_timeout_s=0.3)
    assert not final.exists()


def test_concurrent_builds_build_once(built: BuiltModel, tmp_path: Path) -> None:
    """Two processes asked at once: one builds, the other waits, both print the same folder."""
    cmd = [sys.executable, "-m", "pdx.model", "build", "--preset", "tiny", "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "PDX_DATA_DIR"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        outs.append(out.decode().strip())
    assert outs[0] == outs[1] == str(model_path("tiny", tmp_path))
    entries = sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock"))
    assert entries == [preset("tiny").folder_name]  # no temp folder left behind
    assert load(Path(outs[0])).files == built.files


def test_cli_help_and_path(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pdx.model", "--help"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "build" in out.stdout and "presets" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pdx.model", "path", "--preset", "small", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(model_path("small", tmp_path))
    assert not (tmp_path / "models").exists()
    bad = subprocess.run([sys.executable, "-m", "pdx.model", "verify", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "not a complete pdx model folder" in bad.stderr
