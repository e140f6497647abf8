"""A byte-level BPE tokenizer trained on the demo corpus, saved in Hugging Face format.

Byte-level BPE (GPT-2 style) covers every string without an unknown token and decodes
back to exactly the text it encoded, so no `<unk>` is needed. The result is a
`transformers.PreTrainedTokenizerFast` that `AutoTokenizer.from_pretrained(out_dir)` reloads.

Special tokens: `<bos>`, `<eos>`, `<pad>`, and the chat role markers `<|system|>`,
`<|user|>`, `<|assistant|>`. With `add_special_tokens=True` (the default) encoding prepends
`<bos>`, Llama style; EOS and padding are left to the data code, as is the padding side.
"""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Zephyr-style turns: "<|user|>\n{content}<eos>\n"; the generation prompt opens an assistant
# turn. Roles outside system/user/assistant are refused so a typo fails loudly.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Sequence[str], out_dir: str | Path, *, vocab_size: int = 512) -> str:
    """Trains byte-level BPE on `texts` and saves it with `save_pretrained(out_dir)`.

    Deterministic: the same `texts` and `vocab_size` give the same files.

    Args:
      texts: the training corpus.
      out_dir: where `tokenizer.json`, `tokenizer_config.json` etc. are written.
      vocab_size: total vocabulary, specials and the 256 byte tokens included.

    Returns:
      `str(out_dir)`, ready for `AutoTokenizer.from_pretrained`.
    """
    special_tokens = [BOS, EOS, PAD, *ROLE_TOKENS]
    min_vocab_size = len(special_tokens) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_vocab_size:
        raise ValueError(f"vocab_size must be at least {min_vocab_size}, got {vocab_size}")

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: the first word of a text is not silently given a space, so
    # decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(out_dir)
    return str(out_dir)
