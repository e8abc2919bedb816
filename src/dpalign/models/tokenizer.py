"""A byte-level BPE tokenizer trained locally with ``tokenizers``, plus the chat template.

Byte-level BPE round-trips any text exactly (unseen words fall back to bytes), so the same
tokenizer serves the world's vocabulary and a user's free text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|end|>", "<unk>"
IMAGE = "<image>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, *ROLE_TOKENS)

# Content may be a string or a list of parts ({"type": "image"} / {"type": "text"}), the
# layout transformers processors use; each turn is "<|role|>content<|end|>".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, *,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS, eos: str = EOS,
                    pad: str = PAD, image: str = IMAGE, bos: str | None = BOS,
                    unk: str | None = UNK,
                    chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    ``special_tokens`` get the first ids, in order, and are never split; ``eos``, ``pad``,
    ``image`` (and ``bos``/``unk`` when they are among them) name the roles. The defaults
    give the project's own layout; other model families pass theirs (``tiny_families``)."""
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    roles = {"bos_token": bos, "unk_token": unk}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad,
        eos_token=eos,
        **{k: v for k, v in roles.items() if v in special_tokens},
        extra_special_tokens={"image_token": image},
        padding_side="right",
        model_max_length=512,
    )
    named = {pad, eos, *(v for v in roles.values() if v)}
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in special_tokens if t not in named]})
    tokenizer.chat_template = chat_template
    return tokenizer
