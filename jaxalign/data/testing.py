"""A tiny word-level tokenizer with a chat template, built offline, for tests of any module.

One token per word or punctuation mark, so tests can write expected ids and masks by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = (
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
)

# Each turn: `<|role|> content`, closed by `</s>` (EOS) for assistant turns and `<|end|>` otherwise.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog .",
    "hello world , how are you today ?",
    "i am fine , thank you . and you ?",
    "what is the capital of france ? paris is the capital of france .",
    "Human : Assistant : a good answer , a bad answer , yes no maybe",
    "one two three four five six seven eight nine ten",
    "tell me a joke please sure here is one why not ok",
)


def build_tiny_tokenizer(
    directory: str | os.PathLike,
    *,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    chat_template: str | None = CHAT_TEMPLATE,
    with_bos: bool = True,
) -> Any:
    """Trains a WordLevel tokenizer on `corpus`, saves it to `directory`, reloads it with
    `AutoTokenizer.from_pretrained` (as a trainer would) and returns it.

    Special tokens: `<pad>`=0, `<unk>`=1, `<s>`=2 (BOS, unless `with_bos=False`), `</s>`=3 (EOS),
    then the chat role markers; words follow in frequency order.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    word_level.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        bos_token="<s>" if with_bos else None,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(os.fspath(directory))
    return AutoTokenizer.from_pretrained(os.fspath(directory))
