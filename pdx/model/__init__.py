"""The embedded default model: a random-weight Llama and a locally trained tokenizer.

Built on first use without any download, deterministic from a seed, cached under
``<data dir>/models``. ``tiny`` is for tests, ``small`` for benchmarks::

    from pdx.model import ensure_model
    path = ensure_model("tiny").path      # vLLM: --model <path>

Importing this package is cheap; torch/transformers/tokenizers load only when a model
is actually built. Command line: ``python -m pdx.model build --preset tiny``.
"""

from pdx.model.build import BuiltModel, ensure_model, load, model_path, models_dir, verify
from pdx.model.spec import PRESETS, ModelSpec, preset
from pdx.model.text import paragraph

__all__ = [
    "PRESETS",
    "BuiltModel",
    "ModelSpec",
    "ensure_model",
    "load",
    "model_path",
    "models_dir",
    "paragraph",
    "preset",
    "verify",
]
