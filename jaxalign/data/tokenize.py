"""Turning one raw row into token ids and a loss mask (SFT), a preference pair, or a prompt.

Every function takes the row's `where` (`file:line`) and raises `DataError` naming it and the field
for a bad row. Token conventions, shared by all three:

* Text is encoded with `add_special_tokens=False`; the tokenizer's BOS (if it has one) is put in
  front unless the chat template already starts with it.
* Prompt and response are encoded *separately* and concatenated, so the boundary is exact and a
  prompt encodes exactly as it will at generation time.
* Plain-string completions/responses get EOS appended. Chat responses end however the chat
  template ends an assistant turn (e.g. `<|im_end|>`); nothing is added.
* `loss_mask[t] = 1` iff token t is a completion/assistant token to be predicted from t-1, so
  `loss_mask[0]` is always 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jaxalign.data.errors import DataError, RowStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HH_ASSISTANT_MARKER = "\n\nAssistant:"
REFERENCE_LOGP_FIELDS = ("reference_chosen_logps", "reference_rejected_logps")

Row = dict[str, Any]
Message = dict[str, str]


# ---------------------------------------------------------------------------------------------
# Field access with typed errors.


def _get(row: Row, field: str, where: str) -> Any:
    value = row.get(field)
    if value is None:
        raise DataError(where, field, "missing_field", "required field is missing")
    return value


def _get_str(row: Row, field: str, where: str) -> str:
    value = _get(row, field, where)
    if not isinstance(value, str):
        detail = f"expected a string, got {type(value).__name__}"
        raise DataError(where, field, "wrong_type", detail)
    return value


def _check_messages(value: Any, field: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        detail = f"expected a non-empty list of {{role, content}}, got {type(value).__name__}"
        raise DataError(where, field, "wrong_type", detail)
    for index, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            detail = f"message {index} must be {{'role': str, 'content': str}}, got {message!r}"
            raise DataError(where, field, "wrong_type", detail[:300])
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ---------------------------------------------------------------------------------------------
# Encoding helpers.


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        return [bos, *ids]
    return ids


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; completions need one to end")
    return [tokenizer.eos_token_id]


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, add_generation_prompt: bool
) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("rows with chat messages need a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _left_truncate(ids: list[int], length: int, bos: int | None) -> list[int]:
    """Keeps the last `length` tokens (the end of a prompt), keeping a leading BOS in place."""
    if len(ids) <= length:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos, *ids[len(ids) - (length - 1) :]]
    return ids[len(ids) - length :]


def _int32(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# SFT.


def chat_segments(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    where: str,
    field: str = "messages",
    train_from: int = 0,
) -> list[tuple[str, bool]]:
    """Splits a rendered conversation into `(text, is_assistant)` pieces, in order.

    Assistant turns before message `train_from` count as context (`is_assistant=False`): a
    conversational prompt-completion row trains on its completion only.

    The span of assistant turn i is `render(messages[:i+1])` minus its prefix
    `render(messages[:i], add_generation_prompt=True)`: it holds the reply and the template's
    end-of-turn, never the assistant header. Found by rendering prefixes, never by searching the
    text for the reply, so repeated or templated-away content cannot misplace it. A template that
    rewrites earlier turns (prefixes not stable) is a bad row.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < train_from:
            continue
        start_text = _render(tokenizer, messages[:index], add_generation_prompt=True)
        end_text = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if (
            not end_text.startswith(start_text)
            or not full.startswith(end_text)
            or len(start_text) < cursor
        ):
            detail = f"chat template does not render message {index} as a prefix extension"
            raise DataError(where, field, "template_not_prefix_stable", detail)
        pieces.append((full[cursor : len(start_text)], False))
        pieces.append((full[len(start_text) : len(end_text)], True))
        cursor = len(end_text)
    pieces.append((full[cursor:], False))
    return [(text, is_assistant) for text, is_assistant in pieces if text]


def tokenize_sft(
    row: Row,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    where: str,
    stats: RowStats | None = None,
) -> dict[str, np.ndarray] | None:
    """Tokenises an SFT row: `{text}`, `{prompt, completion}` (strings, or message lists) or
    `{messages}`.

    Returns:
      `{"input_ids": int32[n], "loss_mask": int32[n]}` with n <= max_length: every token of a
      `text` row, the completion (its assistant turns for message lists), or every assistant turn of
      `messages` has loss 1, the rest 0. `{text: t}` tokenises as `{prompt: "", completion: t}`,
      and `{prompt: [turns], completion: [reply]}` as `{messages: [turns, reply]}` when the prompt
      holds no assistant turn. A row longer than max_length follows `stats.on_long_row` (cut at
      max_length by default, counted in `stats.truncated[field]`; `None` when skipped); a prompt
      that leaves no room for one completion token is a bad row (`prompt_too_long`).
    """
    prompt = row.get("prompt")
    if row.get("messages") is not None or isinstance(prompt, list):
        ids, mask, field = _chat_sft(row, tokenizer, where)
    else:
        if row.get("completion") is None and row.get("text") is not None:
            field, prompt, completion = "text", "", _get_str(row, "text", where)
        else:
            field = "completion"
            prompt, completion = _get_str(row, "prompt", where), _get_str(row, field, where)
        if not completion.strip():
            raise DataError(where, field, "empty_completion", f"{field} is empty")
        prompt_ids = _with_bos(tokenizer, _encode(tokenizer, prompt))
        completion_ids = _encode(tokenizer, completion) + _eos(tokenizer)
        ids = prompt_ids + completion_ids
        mask = [0] * len(prompt_ids) + [1] * len(completion_ids)

    first_target = next((t for t, m in enumerate(mask) if m and t > 0), None)
    if first_target is None or first_target >= max_length:
        prompt_field = "prompt" if field in ("completion", "text") else field
        detail = f"prompt is {first_target or len(ids)} tokens, leaving no room in max_length={max_length}"
        raise DataError(where, prompt_field, "prompt_too_long", detail)
    if len(ids) > max_length:
        detail = f"{len(ids)} tokens > data.max_length={max_length}"
        if not _keep_long_row(stats, where, field, detail):
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    mask[0] = 0  # nothing predicts the first token
    return {"input_ids": _int32(ids), "loss_mask": _int32(mask)}


def _keep_long_row(stats: RowStats | None, where: str, field: str, detail: str) -> bool:
    """`stats.long_row` (the `on_long_row` policy); without stats, truncate uncounted."""
    return True if stats is None else stats.long_row(where, field, detail)


def _chat_sft(
    row: Row, tokenizer: PreTrainedTokenizerBase, where: str
) -> tuple[list[int], list[int], str]:
    """ids, loss mask and field of a `{messages}` or conversational `{prompt, completion}` row."""
    if row.get("messages") is not None:
        field, train_from = "messages", 0
        messages = _check_messages(row["messages"], field, where)
    else:
        field = "completion"
        prompt = _check_messages(row["prompt"], "prompt", where)
        messages = prompt + _check_messages(_get(row, field, where), field, where)
        train_from = len(prompt)
    trained = [m for m in messages[train_from:] if m["role"] == "assistant"]
    if not trained:
        raise DataError(where, field, "no_assistant_turn", f"{field} has no assistant turn")
    if any(not m["content"].strip() for m in trained):
        raise DataError(where, field, "empty_completion", "an assistant turn is empty")
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in chat_segments(
        tokenizer, messages, where=where, field=field, train_from=train_from
    ):
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, mask = [tokenizer.bos_token_id, *ids], [0, *mask]
    return ids, mask, field


# ---------------------------------------------------------------------------------------------
# Preference pairs.


class PreferenceText(NamedTuple):
    """A preference row split into text. `chosen`/`rejected` follow `prompt` directly;
    `*_content` is the bare response (the last assistant message for chats) used to drop pairs."""

    prompt: str
    chosen: str
    rejected: str
    chosen_content: str
    rejected_content: str
    is_chat: bool


def split_preference(row: Row, tokenizer: PreTrainedTokenizerBase, *, where: str) -> PreferenceText:
    """Splits the three accepted preference formats into prompt and two responses.

    * `{prompt: str, chosen: str, rejected: str}`: used as is.
    * Chat (UltraFeedback-binarized / TRL conversational): `chosen`/`rejected` are message lists
      whose last message is the assistant reply; `prompt` is a message list prepended to both,
      or a string (prepended as a user turn only if the lists hold no user turn), or absent.
      Everything before the last message must agree; the prompt is it rendered with
      `add_generation_prompt=True`, each response the rest of the full rendering.
    * Implicit prompt, strings (only `chosen`/`rejected`): Anthropic HH transcripts split after
      the last `"\\n\\nAssistant:"` of their common prefix; other texts, as TRL's
      `extract_prompt`, at the last whitespace of their common prefix (the responses keep it).
    * Implicit prompt, message lists: everything before the last (assistant) message, which must
      agree between the two.
    """
    chosen, rejected = _get(row, "chosen", where), _get(row, "rejected", where)
    prompt = row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            return _split_hh(chosen, rejected, where)
        if not isinstance(prompt, str):
            detail = f"expected a string with string responses, got {type(prompt).__name__}"
            raise DataError(where, "prompt", "wrong_type", detail)
        return PreferenceText(prompt, chosen, rejected, chosen, rejected, is_chat=False)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _split_chat(prompt, chosen, rejected, tokenizer, where)
    field = "rejected" if isinstance(chosen, str | list) else "chosen"
    detail = "chosen and rejected must both be strings or both be message lists"
    raise DataError(where, field, "wrong_type", detail)


def _split_hh(chosen: str, rejected: str, where: str) -> PreferenceText:
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    if chosen == rejected:  # identical pairs are dropped later; any split will do
        common = len(chosen)
    marker = chosen.rfind(HH_ASSISTANT_MARKER, 0, common)
    if marker >= 0 and marker + len(HH_ASSISTANT_MARKER) <= common:
        cut = marker + len(HH_ASSISTANT_MARKER)
    else:
        # TRL's implicit prompt: the shared leading text, cut back to a word boundary so both
        # responses start with their first whole word (and the space before it).
        cut = max(chosen.rfind(c, 0, common + 1) for c in " \n\t")
        if cut <= 0 and chosen != rejected:
            detail = "no prompt field and no shared leading text to take as the prompt"
            raise DataError(where, "prompt", "missing_field", detail)
        cut = max(cut, 0)
    prompt, chosen_response, rejected_response = chosen[:cut], chosen[cut:], rejected[cut:]
    return PreferenceText(
        prompt, chosen_response, rejected_response, chosen_response, rejected_response, False
    )


def _split_chat(
    prompt: Any, chosen: list, rejected: list, tokenizer: PreTrainedTokenizerBase, where: str
) -> PreferenceText:
    chosen_messages = _check_messages(chosen, "chosen", where)
    rejected_messages = _check_messages(rejected, "rejected", where)
    if isinstance(prompt, list):
        prompt_messages = _check_messages(prompt, "prompt", where)
    elif isinstance(prompt, str):
        has_user_turn = any(m["role"] != "assistant" for m in chosen_messages)
        prompt_messages = [] if has_user_turn else [{"role": "user", "content": prompt}]
    elif prompt is None:
        prompt_messages = []
    else:
        detail = f"expected a string or message list, got {type(prompt).__name__}"
        raise DataError(where, "prompt", "wrong_type", detail)
    full_chosen = prompt_messages + chosen_messages
    full_rejected = prompt_messages + rejected_messages
    for field, conversation in (("chosen", full_chosen), ("rejected", full_rejected)):
        if conversation[-1]["role"] != "assistant":
            detail = "the last message must be the assistant response"
            raise DataError(where, field, "wrong_type", detail)
    history = full_chosen[:-1]
    if not history:
        raise DataError(where, "prompt", "missing_field", "no prompt messages before the response")
    if full_rejected[:-1] != history:
        detail = "chosen and rejected differ before the last assistant message"
        raise DataError(where, "rejected", "mismatched_conversations", detail)
    prompt_text = _render(tokenizer, history, add_generation_prompt=True)
    responses = []
    for field, conversation in (("chosen", full_chosen), ("rejected", full_rejected)):
        text = _render(tokenizer, conversation, add_generation_prompt=False)
        if not text.startswith(prompt_text):
            detail = "chat template does not render the response as a prefix extension"
            raise DataError(where, field, "template_not_prefix_stable", detail)
        responses.append(text[len(prompt_text) :])
    return PreferenceText(
        prompt_text,
        responses[0],
        responses[1],
        full_chosen[-1]["content"],
        full_rejected[-1]["content"],
        is_chat=True,
    )


def tokenize_preference(
    row: Row,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
    where: str,
    stats: RowStats | None = None,
) -> dict[str, Any] | None:
    """Tokenises a preference row; `None` when the pair is dropped (reason counted in `stats`).

    Truncation (`stats.on_long_row="truncate"`, the default): the prompt keeps its *end*
    (left-truncated to `max_prompt_length`, BOS kept), then each response is cut so prompt +
    response <= `max_length`; `"skip"` drops such a pair (`too_long`), `"error"` raises. Dropped:
    identical responses (`identical_responses`, also after truncation) and empty ones
    (`empty_response`).

    Returns:
      `{"prompt_ids", "chosen_ids", "rejected_ids"}` int32 arrays (responses exclude the prompt),
      plus `reference_chosen_logps`/`reference_rejected_logps` floats when the row has them.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})"
        )
    text = split_preference(row, tokenizer, where=where)
    example: dict[str, Any] = {}
    if any(row.get(name) is not None for name in REFERENCE_LOGP_FIELDS):
        for name in REFERENCE_LOGP_FIELDS:
            value = _get(row, name, where)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                detail = f"expected a number, got {value!r}"
                raise DataError(where, name, "wrong_type", detail)
            example[name] = float(value)

    def drop(reason: str) -> None:
        if stats is not None:
            stats.drop(reason)

    if not text.chosen_content.strip() or not text.rejected_content.strip():
        return drop("empty_response")
    if text.chosen_content == text.rejected_content:
        return drop("identical_responses")

    prompt_ids = _with_bos(tokenizer, _encode(tokenizer, text.prompt))
    if len(prompt_ids) > max_prompt_length:
        detail = f"{len(prompt_ids)} tokens > data.max_prompt_length={max_prompt_length}"
        if not _keep_long_row(stats, where, "prompt", detail):
            return None
        prompt_ids = _left_truncate(prompt_ids, max_prompt_length, tokenizer.bos_token_id)
    room = max_length - len(prompt_ids)
    responses = {}
    for name, response in (("chosen", text.chosen), ("rejected", text.rejected)):
        ids = _encode(tokenizer, response) + ([] if text.is_chat else _eos(tokenizer))
        if len(ids) > room:
            total = len(prompt_ids) + len(ids)
            detail = f"prompt + {name} is {total} tokens > data.max_length={max_length}"
            if not _keep_long_row(stats, where, name, detail):
                return None
            ids = ids[:room]
        responses[name] = ids
    if responses["chosen"] == responses["rejected"]:
        return drop("identical_responses")
    return {
        "prompt_ids": _int32(prompt_ids),
        "chosen_ids": _int32(responses["chosen"]),
        "rejected_ids": _int32(responses["rejected"]),
        **example,
    }


# ---------------------------------------------------------------------------------------------
# Prompts (PPO rollouts, evaluation).


def render_prompt(row: Row, tokenizer: PreTrainedTokenizerBase, *, where: str) -> str:
    """The text a policy continues: a `prompt` string as is; a `prompt` message list, or
    `messages` without its trailing assistant turns, rendered with `add_generation_prompt=True`."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(where, "prompt", "empty_prompt", "prompt is empty")
        return prompt
    if prompt is not None:
        messages = _check_messages(prompt, "prompt", where)
        return _render(tokenizer, messages, add_generation_prompt=True)
    if row.get("messages") is None:
        raise DataError(
            where, "prompt", "missing_field", "required field is missing (or 'messages')"
        )
    messages = _check_messages(row["messages"], "messages", where)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(where, "messages", "empty_prompt", "no turns before the assistant reply")
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_prompt(
    row: Row,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    where: str,
    stats: RowStats | None = None,
) -> dict[str, np.ndarray] | None:
    """`{"prompt_ids": int32[n]}`, n <= max_prompt_length, keeping the prompt's end (and BOS);
    `None` when a longer prompt is skipped (`stats.on_long_row="skip"`)."""
    ids = _with_bos(tokenizer, _encode(tokenizer, render_prompt(row, tokenizer, where=where)))
    if len(ids) > max_prompt_length:
        detail = f"{len(ids)} tokens > data.max_prompt_length={max_prompt_length}"
        if not _keep_long_row(stats, where, "prompt", detail):
            return None
        ids = _left_truncate(ids, max_prompt_length, tokenizer.bos_token_id)
    return {"prompt_ids": _int32(ids)}
