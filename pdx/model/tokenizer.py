"""Train the embedded model's byte-level BPE tokenizer on generated text and save it.

Called by ``pdx.model.build`` inside the build lock; blocking (well under a second for
the presets). Needs ``tokenizers`` and ``transformers`` (both come with vLLM).

The result is a ``PreTrainedTokenizerFast`` folder (``tokenizer.json``,
``tokenizer_config.json`` and the chat template) that vLLM and ``AutoTokenizer`` load
from a local path. No BOS is added automatically, so the token ids of a completion
prompt are exactly ``tokenizer.encode(prompt)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pdx.errors import ModelError
from pdx.model.spec import ModelSpec
from pdx.model.text import sentences

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)

#: Minimal chat format so ``/v1/chat/completions`` works: one header line per message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train(spec: ModelSpec) -> Tokenizer:
    """Train and return a ``tokenizers.Tokenizer`` with exactly ``spec.vocab_size`` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(spec.seed, spec.corpus_sentences), trainer=trainer)
    got = tok.get_vocab_size()
    if got != spec.vocab_size:
        raise ModelError(f"model spec {spec.name!r}: the tokenizer reached {got} tokens, not "
                         f"{spec.vocab_size}; lower vocab_size or raise corpus_sentences")
    return tok


def save(spec: ModelSpec, folder: Path) -> dict[str, int]:
    """Train the tokenizer and save it into ``folder``; return the special token ids."""
    from transformers import PreTrainedTokenizerFast

    tok = train(spec)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    vocab = tok.get_vocab()
    return {name: int(vocab[t]) for name, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
