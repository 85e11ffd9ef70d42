"""G-Eval: a judge model's probability-weighted 1-5 score (Liu et al. 2023, arXiv 2303.16634).

For each (prompt, response) pair and criterion the judge reads a fixed evaluation prompt
(``fteval/eval/prompts/geval_<version>.json``: criterion definition, evaluation steps, the
pair, an evaluation form) chat-formatted for the judge, followed by the start of its answer
(``answer_prefix``, e.g. ``"Harmlessness: "``). One forward pass gives the next-token logits;
with ``l_k`` the logit of the score token ``"k"`` (k = 1..5)

    p_k   = softmax(l_1..l_5)_k              (renormalised over the five score tokens)
    score = sum_k k * p_k                    in [1, 5]
    mass  = sum_k softmax(all logits)_k      (how much the judge wanted to answer with a digit)

exactly, without sampling (the paper estimates the same expectation from 20 samples). A low
``mass`` means the judge was not following the form and the score says little.

The judge is the baseline model by default: given a PeftModel or a model with GRIT layers,
scoring runs with the adapters switched off. Prompts are batched and LEFT-padded, with
position ids counted from each row's first real token, so a padded row scores as it would alone.
The judge inputs of one call share their opening tokens (system prompt, task, criterion, steps: most
of each input); the judge reads that shared prefix once, keeps its key/value cache, and runs only
each pair's own tokens on top of it. The next-token logits are those of the full input up to
floating-point rounding (``tests/eval/test_geval.py`` holds scores to 1e-4 of one unpadded forward
per pair).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fteval.eval.prompt_files import load_prompt_file
from fteval.data.formatting import Template, format_prompt, pad_batch

__all__ = ["CRITERIA", "GEvalJudge", "GEvalScore", "load_geval_prompts", "score_token_ids", "shared_prefix_length"]

CRITERIA = ("helpfulness", "harmlessness", "instruction_following")
SCORES = ("1", "2", "3", "4", "5")
MIN_SHARED_PREFIX = 16  # tokens; a shorter common opening is run with each row instead of once


@dataclass(frozen=True)
class GEvalScore:
    """``score`` in [1, 5]; ``probs`` the renormalised probabilities of "1".."5" (sum 1); ``mass``
    the five tokens' probability before renormalising, in (0, 1]."""

    score: float
    probs: tuple[float, float, float, float, float]
    mass: float


def load_geval_prompts(version: str = "v1") -> dict:
    """The judge prompt set ``geval_<version>.json`` shipped in ``fteval/eval/prompts``."""
    data = load_prompt_file("geval", version, ("template", "answer_prefix", "criteria"), "G-Eval prompts")
    path = f"geval_{version}.json"
    for name, crit in data["criteria"].items():
        missing = [k for k in ("name", "definition", "steps") if k not in crit]
        if missing:
            raise ValueError(f"{path}: criterion {name!r} lacks {missing}")
    return data


def score_token_ids(tokenizer, context: str) -> list[int]:
    """Token ids of "1".."5" as the judge would emit them right after ``context``.

    Raises ValueError when a digit is not exactly one new token after ``context`` (a tokenizer
    that merges it with the preceding text, or splits it), since the score would then not be a
    next-token distribution.
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = []
    for digit in SCORES:
        full = tokenizer(context + digit, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ValueError(
                f"the judge's tokenizer does not encode score {digit!r} as one token after the answer prefix "
                f"(context ends {context[-20:]!r}); G-Eval needs single-token scores: use a prompts version whose "
                "answer_prefix ends differently, or another judge"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"score tokens {SCORES} map to repeated ids {ids}")
    return ids


def _cache_name(model: nn.Module) -> str:
    """What the model's forward calls its key/value cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """Tokens that every sequence of ``encoded`` starts with, leaving at least one own token per sequence."""
    if not encoded:
        return 0
    n = min(len(e) for e in encoded) - 1
    first = encoded[0]
    for e in encoded[1:]:
        k = 0
        while k < n and e[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class GEvalJudge:
    """Score (prompt, response) pairs on G-Eval criteria with a causal LM judge.

    Args:
        model: the judge (a causal LM; a PeftModel or a model with GRIT layers is run with its
            adapters off when ``adapters_off``).
        tokenizer: its tokenizer.
        prompts_version: which ``geval_<version>.json`` to use.
        batch_size: pairs per forward pass.
        max_prompt_tokens / max_response_tokens: the request and the response are cut to this
            many tokens before they are placed in the judge prompt.
        template: chat formatting, passed to ``format_prompt``.
        adapters_off: judge with the base model (default), not the tuned one.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        prompts_version: str = "v1",
        batch_size: int = 8,
        max_prompt_tokens: int = 384,
        max_response_tokens: int = 512,
        template: Template = "auto",
        adapters_off: bool = True,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.prompts = load_geval_prompts(prompts_version)
        self.version = prompts_version
        self.batch_size = int(batch_size)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_response_tokens = int(max_response_tokens)
        self.template: Template = template
        self.adapters_off = bool(adapters_off)
        self.token_ids = {c: score_token_ids(tokenizer, self._text(c, "x", "y")) for c in self.criteria}

    @classmethod
    def from_pretrained(cls, name_or_path: str = "embedded", **kwargs) -> "GEvalJudge":
        """Load the judge with :func:`fteval.models.loading.load_causal_lm` (full precision)."""
        from fteval.models.loading import load_causal_lm

        loaded = load_causal_lm(name_or_path)
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    @property
    def criteria(self) -> list[str]:
        return list(self.prompts["criteria"])

    def _cut(self, text: str, n: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else self.tokenizer.decode(ids[:n]) + " [...]"

    def _text(self, criterion: str, prompt: str, response: str) -> str:
        """The judge's full input: chat-formatted evaluation prompt + answer prefix."""
        crit = self.prompts["criteria"][criterion]
        steps = "\n".join(f"{i}. {s}" for i, s in enumerate(crit["steps"], 1))
        user = self.prompts["template"].format(
            name=crit["name"], definition=crit["definition"], steps=steps, prompt=prompt, response=response
        )
        head = format_prompt(self.tokenizer, user, self.template, system_prompt=self.prompts.get("system"))
        return head + self.prompts["answer_prefix"].format(name=crit["name"])

    def _check(self, prompts: Sequence[str], responses: Sequence[str], criterion: str) -> None:
        if criterion not in self.prompts["criteria"]:
            raise ValueError(f"unknown G-Eval criterion {criterion!r}; choose one of {self.criteria}")
        if isinstance(prompts, str) or isinstance(responses, str):
            raise ValueError("score takes lists of prompts and responses, not single strings")
        if len(prompts) != len(responses):
            raise ValueError(f"score got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt")

    def next_token_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Next-token logits after each text, ``[n, vocab]`` float32 (batched, left-padded, shared prefix read once)."""
        from fteval.backends.hf import adapters_disabled

        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        shared = shared_prefix_length(encoded)
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        device = next(self.model.parameters()).device
        rows: list[Optional[torch.Tensor]] = [None] * len(texts)
        was_training = self.model.training
        self.model.eval()
        context = adapters_disabled(self.model) if self.adapters_off else nullcontext()
        try:
            with context, torch.no_grad():
                prefix = self._prefix_cache(encoded[0][:shared], device) if shared else None
                if prefix is None:
                    shared = 0
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    batch = pad_batch([{"input_ids": encoded[i][shared:]} for i in chunk], self.tokenizer.pad_token_id,
                                      side="left")
                    ids = batch["input_ids"].to(device)  # [b, seq - shared]
                    mask = batch["attention_mask"].to(device)  # [b, seq - shared]
                    positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)  # [b, seq - shared]
                    cache = None
                    if prefix is not None:
                        cache = copy.deepcopy(prefix)
                        cache.batch_repeat_interleave(len(chunk))  # [b, heads, shared, head_dim] per layer
                        mask = torch.cat([mask.new_ones(len(chunk), shared), mask], dim=1)  # [b, seq]
                    logits = self._forward(ids, mask, positions, cache)[:, -1, :].float()  # [b, vocab]
                    for row, i in zip(logits, chunk):
                        rows[i] = row.cpu()
        finally:
            self.model.train(was_training)
        return torch.stack(rows)  # type: ignore[arg-type]

    def _prefix_cache(self, ids: list[int], device: torch.device):
        """The key/value cache of the shared opening tokens (batch 1); None for a model that keeps none."""
        tokens = torch.tensor([ids], device=device)  # [1, shared]
        try:
            out = self.model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=True, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep or a cache
            return None
        cache = getattr(out, _cache_name(self.model), None)
        return cache if cache is not None and hasattr(cache, "batch_repeat_interleave") else None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache is not None)
        if cache is not None:
            kwargs[_cache_name(self.model)] = cache
        try:
            return self.model(**kwargs, logits_to_keep=1).logits  # [b, 1, vocab]
        except TypeError:  # models without logits_to_keep
            return self.model(**kwargs).logits  # [b, seq, vocab]

    def score(self, prompts: Sequence[str], responses: Sequence[str], criterion: str) -> list[GEvalScore]:
        """G-Eval scores of ``responses`` to ``prompts`` on ``criterion`` (same order)."""
        self._check(prompts, responses, criterion)
        if not prompts:
            return []
        texts = [
            self._text(criterion, self._cut(p, self.max_prompt_tokens), self._cut(r, self.max_response_tokens))
            for p, r in zip(prompts, responses)
        ]
        logits = self.next_token_logits(texts)  # [n, vocab]
        ids = torch.tensor(self.token_ids[criterion])
        sub = logits[:, ids]  # [n, 5]
        probs = torch.softmax(sub, dim=-1)  # [n, 5], renormalised over the score tokens
        mass = torch.exp(torch.logsumexp(sub, -1) - torch.logsumexp(logits, -1))  # [n]
        values = probs @ torch.arange(1, 6, dtype=probs.dtype)  # [n]
        return [
            GEvalScore(score=float(v), probs=tuple(float(x) for x in p), mass=float(m))  # type: ignore[arg-type]
            for v, p, m in zip(values, probs, mass)
        ]
