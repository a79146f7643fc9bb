"""Chat-template tokenization: conversations -> token ids, with loss masks, for every stage.

Assistant-only labels come from rendering the conversation incrementally: the tokens between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])` are message i's
answer (its content, the turn-end token and whatever the template puts after it). This needs
no `{% generation %}` markers in the template and works for any template whose renderings of
a conversation's prefixes are prefixes of each other (ChatML, Llama 3, Qwen, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.algo.sft import IGNORE_INDEX
from rlhf.infra.errors import UserError


def render_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def encode_sft(
    tokenizer: Any,
    messages: list[dict],
    max_length: int,
    assistant_only: bool = True,
    keep_end: bool = False,
) -> dict[str, list[int]]:
    """One conversation -> {"input_ids", "labels"}; labels are IGNORE_INDEX outside answers.

    Over max_length, the START is kept (the answer's tail is lost), or with `keep_end` the END
    (the prompt's start is lost: `data.truncate_long_prompts`, e.g. long HH transcripts).
    """
    ids = render_ids(tokenizer, messages, add_generation_prompt=False)
    if not assistant_only:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render_ids(tokenizer, messages[:i], add_generation_prompt=True)
            through = render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if ids[: len(before)] != before or ids[: len(through)] != through:
                raise UserError(
                    f"chat template of '{tokenizer.name_or_path}': rendering a conversation's "
                    "first turns is not a prefix of rendering it whole, so assistant-only "
                    "labels cannot be found; set sft.assistant_only_loss: false or fix the template"
                )
            labels[len(before) : len(through)] = ids[len(before) : len(through)]
    if keep_end:
        return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_prompt_response(
    tokenizer: Any, prompt: list[dict], response: str, max_length: int, finished: bool = True
) -> list[int]:
    """(prompt messages, assistant reply) -> ids of the whole rendered conversation, keeping
    the END when too long (where the reward is read). `finished=False` (a reply cut off at
    max_new_tokens) leaves out the end-of-turn token, so the answer does not look complete.
    """
    messages = [*prompt, {"role": "assistant", "content": response}]
    if finished:
        return render_ids(tokenizer, messages, False)[-max_length:]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    end = text.rfind(response) if response else -1
    if end < 0:  # the template changed the reply (trimmed it): header + the reply's tokens
        head = render_ids(tokenizer, prompt, add_generation_prompt=True)
        return (head + tokenizer.encode(response, add_special_tokens=False))[-max_length:]
    cut = text[: end + len(response)]
    return tokenizer(cut, add_special_tokens=False)["input_ids"][-max_length:]


def encode_prompt(tokenizer: Any, prompt: list[dict], max_length: int) -> list[int]:
    """Prompt messages + the assistant header, ready for generation (keeps the END if long)."""
    return render_ids(tokenizer, prompt, add_generation_prompt=True)[-max_length:]


def pad_batch(
    sequences: list[list[int]],
    pad_id: int,
    side: str = "right",
    labels: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad to the longest row. The attention mask comes from lengths, never from `ids != pad`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
        if labels is not None:
            lab[row, cols] = torch.tensor(labels[row], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = lab
    return batch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_user_text(messages: list[dict[str, str]]) -> str:
    """The last user turn of a conversation (what a sample's "prompt" shows)."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else messages[-1]["content"]
