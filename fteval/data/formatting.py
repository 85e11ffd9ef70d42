"""Chat formatting, tokenisation with response-only labels, and padding.

The tokenizer's own chat template is used whenever it has one (SmolLM2 uses ChatML,
Llama-3 its header tokens). The spec's ``<s>[INST] ... [/INST]`` form is the Llama-2 format;
it is kept only as the named fallback ``"llama2-inst"`` for tokenizers without a template.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

IGNORE_INDEX = -100  # labels with this value do not enter the loss (transformers' convention)
Template = Literal["auto", "chat", "llama2-inst"]


def _use_chat_template(tokenizer, template: Template) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError(
            "template='chat' but this tokenizer has no chat template; use template='llama2-inst' or 'auto'"
        )
    if template not in ("auto", "chat", "llama2-inst"):
        raise ValueError(f"template={template!r} is not one of 'auto', 'chat', 'llama2-inst'")
    return has and template != "llama2-inst"


def format_prompt(tokenizer, prompt: str, template: Template = "auto", system_prompt: Optional[str] = None) -> str:
    """The text a model sees before it answers ``prompt`` (ends with the assistant header)."""
    if _use_chat_template(tokenizer, template):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    sys = f"<<SYS>>\n{system_prompt}\n<</SYS>>\n\n" if system_prompt else ""
    return f"<s>[INST] {sys}{prompt} [/INST]"


#: Stands in for the user's message when measuring what a template appends after it.
_MESSAGE_STAND_IN = "fteval message end."


def generation_suffix_tokens(tokenizer, template: Template = "auto", system_prompt: Optional[str] = None) -> int:
    """How many tokens the prompt format puts after the user's message (the post-instruction tokens).

    ChatML (SmolLM2) appends ``<|im_end|>\\n<|im_start|>assistant\\n`` and Llama-3 ``<|eot_id|>`` plus
    the assistant header; these positions are where a chat model's decision to answer or refuse is
    formed (Arditi et al., NeurIPS 2024, read the refusal direction there). Measured by formatting a
    stand-in message and tokenising with and without what follows it; the templates end the message
    at a special token or a space, so the count does not depend on the message.
    """
    text = format_prompt(tokenizer, _MESSAGE_STAND_IN, template, system_prompt)
    end = text.rfind(_MESSAGE_STAND_IN)
    if end < 0:
        raise ValueError(
            "the chat template does not keep the user's message verbatim, so the tokens after it cannot be "
            "located; evaluate with tokens='prompt' (mean over the prompt's tokens)"
        )
    end += len(_MESSAGE_STAND_IN)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - len(
        tokenizer(text[:end], add_special_tokens=False)["input_ids"])
    if n < 1:
        raise ValueError(
            "the prompt format adds no token after the user's message, so there are no post-instruction tokens to "
            "pool; evaluate with tokens='prompt' (mean over the prompt's tokens)"
        )
    return n


def prompt_token_limit(tokenizer, max_length: int) -> int:
    """Tokens an evaluation prompt may take: ``max_length``, capped by the tokenizer's ``model_max_length``
    (transformers sets that to a huge sentinel when a model states no limit)."""
    model_limit = getattr(tokenizer, "model_max_length", None)
    return model_limit if isinstance(model_limit, int) and 8 <= model_limit < max_length else max_length


def fit_prompt(
    tokenizer, prompt: str, limit: int, template: Template = "auto", system_prompt: Optional[str] = None
) -> tuple[str, str, list[int], bool]:
    """``(message, formatted text, token ids, truncated)`` of an evaluation prompt, at most ``limit`` tokens.

    The rule: a prompt whose formatted form is longer than ``limit`` keeps the first tokens of the
    user's message that fit, and the whole prompt format around it (system message, chat template,
    the post-instruction tokens), so the model still sees a complete turn ending where it answers.
    The message is cut on its own tokens and re-formatted; when re-tokenising the cut text merges
    tokens differently, the cut moves back by the excess until the result fits. ``message`` is the
    user's message as kept (what generation and the judges are given).
    """
    text = format_prompt(tokenizer, prompt, template, system_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return prompt, text, ids, False
    frame = len(tokenizer(format_prompt(tokenizer, "", template, system_prompt), add_special_tokens=False)["input_ids"])
    message = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = min(len(message), limit - frame)
    while keep > 0:
        cut = tokenizer.decode(message[:keep])
        text = format_prompt(tokenizer, cut, template, system_prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return cut, text, ids, True
        keep -= len(ids) - limit
    raise ValueError(
        f"the prompt format alone takes {frame} tokens, more than the limit of {limit}; raise --data.max_length "
        "or shorten --data.system_prompt"
    )


def format_example(
    tokenizer, prompt: str, response: str, template: Template = "auto", system_prompt: Optional[str] = None
) -> tuple[str, str]:
    """Split a formatted conversation into (prompt part, response part); their concatenation is the full text."""
    prompt_text = format_prompt(tokenizer, prompt, template, system_prompt)
    if _use_chat_template(tokenizer, template):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt_text):
            return prompt_text, full[len(prompt_text) :]
        # Templates that rewrite earlier turns when an answer follows: fall back to prompt + answer + EOS.
        return prompt_text, response + (tokenizer.eos_token or "")
    return prompt_text, f" {response}</s>"


def tokenize_example(
    tokenizer,
    prompt: str,
    response: str,
    max_length: int,
    template: Template = "auto",
    system_prompt: Optional[str] = None,
) -> Optional[dict]:
    """Token ids and labels for one training example; prompt tokens get ``IGNORE_INDEX``.

    The response is truncated to fit ``max_length``; ``None`` is returned when the prompt alone
    leaves no room for a response token (the caller counts those as too long).
    """
    prompt_text, response_text = format_example(tokenizer, prompt, response, template, system_prompt)
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    room = max_length - len(p_ids)
    if room <= 0 or not r_ids:
        return None
    r_ids = r_ids[:room]
    return {
        "input_ids": p_ids + r_ids,
        "labels": [IGNORE_INDEX] * len(p_ids) + list(r_ids),
    }


def pad_batch(features: list[dict], pad_token_id: int, side: Literal["right", "left"] = "right",
              multiple_of: int = 1) -> dict:
    """Pad ``input_ids`` (and ``labels`` when present) to the longest row, rounded up to a multiple of
    ``multiple_of``; build ``attention_mask``.

    Other keys holding scalars are stacked into tensors; strings are kept as lists.
    """
    width = max(len(f["input_ids"]) for f in features)
    width = -(-width // multiple_of) * multiple_of
    out: dict = {}
    ids, mask, labels = [], [], []
    for f in features:
        n = len(f["input_ids"])
        pad = [pad_token_id] * (width - n)
        zeros, ones = [0] * (width - n), [1] * n
        if side == "right":
            ids.append(list(f["input_ids"]) + pad)
            mask.append(ones + zeros)
        else:
            ids.append(pad + list(f["input_ids"]))
            mask.append(zeros + ones)
        if "labels" in f:
            lpad = [IGNORE_INDEX] * (width - n)
            labels.append(list(f["labels"]) + lpad if side == "right" else lpad + list(f["labels"]))
    out["input_ids"] = torch.tensor(ids, dtype=torch.long)  # [batch, seq]
    out["attention_mask"] = torch.tensor(mask, dtype=torch.long)  # [batch, seq]
    if labels:
        out["labels"] = torch.tensor(labels, dtype=torch.long)  # [batch, seq]
    for key in features[0]:
        if key in ("input_ids", "attention_mask", "labels"):
            continue
        values = [f[key] for f in features]
        out[key] = torch.tensor(values) if isinstance(values[0], (int, float, bool)) else values
    return out


def flatten_batch(features: list[dict]) -> dict:
    """One padding-free row from ``features`` (each with ``input_ids`` and ``labels``).

    transformers' ``DataCollatorWithFlattening`` concatenates the sequences into
    ``input_ids``/``labels``/``position_ids`` ``[1, total_tokens]`` (positions restart at 0,
    each sequence's first label is -100 so no token predicts across a boundary) and no
    ``attention_mask``: transformers derives per-sequence attention from ``position_ids``.
    ``num_sequences`` (a Python int) is added for logging. Picklable, for DataLoader workers.
    """
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)(
        [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    )
    batch["num_sequences"] = len(features)
    return batch
