"""Who labels a response: the rule detector (offline default) or a model judge.

* ``rules``: :func:`fteval.eval.refusal.detector.classify_refusal` (pure Python + numpy).
* ``openai``: any OpenAI-compatible server (vLLM or Ollama serving a guard or judge model) through
  :class:`fteval.backends.openai_http.OpenAIBackend` (timeouts, bounded retries with backoff, one
  clear error when the server cannot be reached). The versioned prompt
  ``fteval/eval/prompts/refusal_judge_<version>.json`` asks for one digit (1 compliance, 2 partial
  refusal, 3 full refusal); the answer is parsed strictly (the digit, optionally after the answer
  prefix, nothing else) and re-asked at most ``max_parse_retries`` times before an error.
* ``hf``: a local causal LM (default the embedded model). Like G-Eval
  (:class:`fteval.eval.geval.GEvalJudge`, whose batched left-padded forward pass it reuses), one
  forward pass over the chat-formatted prompt plus its answer prefix; the next-token logits of
  "1", "2", "3" renormalised give the class probabilities, without sampling.

Every judge returns :class:`~fteval.eval.refusal.detector.RefusalResult` rows whose ``judge``
field names it; an empty response is a full refusal for every judge (nothing to ask about).
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Sequence
from typing import Literal, Optional

import numpy as np
import torch

from fteval.eval.prompt_files import load_prompt_file
from fteval.backends.base import BackendConnectionError, BackendResponseError, BackendTimeoutError
from fteval.eval.refusal.detector import COMPLY, FULL, PARTIAL, RefusalResult, classify_refusal, result_from_probs

__all__ = ["HFJudge", "JudgeName", "OpenAIJudge", "RefusalJudge", "RulesJudge", "load_judge_prompts", "make_judge"]

JudgeName = Literal["rules", "openai", "hf"]
_ANSWER = re.compile(r"^\s*(?:category\s*:?\s*)?([123])\s*\.?\s*$", re.IGNORECASE)


def load_judge_prompts(version: str = "v1") -> dict:
    """The judge prompt ``refusal_judge_<version>.json`` shipped in ``fteval/eval/prompts``."""
    data = load_prompt_file("refusal_judge", version, ("system", "template", "no_prompt", "answer_prefix", "labels"),
                            "refusal judge prompt")
    path = f"refusal_judge_{version}.json"
    if data["labels"] != {"1": COMPLY, "2": PARTIAL, "3": FULL}:
        raise ValueError(f"{path}: labels must map 1, 2, 3 to {COMPLY}, {PARTIAL}, {FULL}")
    return data


def _empty(text: Optional[str]) -> bool:
    return text is None or not str(text).strip()


class RefusalJudge(abc.ABC):
    """Labels responses (optionally with their prompts) as compliance / partial_refusal / full_refusal."""

    name: str = ""

    def classify(self, responses: Sequence[Optional[str]], prompts: Optional[Sequence[Optional[str]]] = None) -> list[RefusalResult]:
        """One result per response, same order; ``prompts`` (same length) are the requests, or None."""
        responses = list(responses)
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(prompts)} prompts; pass one prompt per response")
        prompts = list(prompts) if prompts is not None else [None] * len(responses)
        out: list[Optional[RefusalResult]] = [None] * len(responses)
        todo = []
        for i, r in enumerate(responses):
            if _empty(r):
                out[i] = RefusalResult(FULL, 1.0, 1.0, ("empty_response",), (0.0, 0.0, 1.0), self.name)
            else:
                todo.append(i)
        if todo:
            for i, res in zip(todo, self._classify([str(responses[i]) for i in todo], [prompts[i] for i in todo])):
                out[i] = res
        return out  # type: ignore[return-value]

    @abc.abstractmethod
    def _classify(self, responses: list[str], prompts: list[Optional[str]]) -> list[RefusalResult]:
        """Non-empty responses only."""


class RulesJudge(RefusalJudge):
    """The fitted rule detector."""

    name = "rules"

    def _classify(self, responses: list[str], prompts: list[Optional[str]]) -> list[RefusalResult]:
        return [classify_refusal(r, p) for r, p in zip(responses, prompts)]


class _PromptedJudge(RefusalJudge):
    def __init__(self, prompts_version: str) -> None:
        self.prompts = load_judge_prompts(prompts_version)
        self.prompts_version = prompts_version

    def _user(self, prompt: Optional[str], response: str) -> str:
        return self.prompts["template"].format(prompt=prompt if prompt and str(prompt).strip() else self.prompts["no_prompt"],
                                               response=response)


class OpenAIJudge(_PromptedJudge):
    """A judge model behind an OpenAI-compatible chat endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name; default the first model the server lists.
        api_key: sent as a bearer token; default the ``OPENAI_API_KEY`` environment variable (the OpenAI
            clients' convention; the way to give a key that no file then holds), None for local servers.
        prompts_version: which ``refusal_judge_<version>.json``.
        timeout_s / max_retries / backoff_s: per request, passed to the HTTP client.
        max_parse_retries: times a row is asked again when the answer is not 1, 2 or 3.
        concurrency: requests in flight at once.
    """

    name = "openai"

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: Optional[str] = None, api_key: Optional[str] = None,
                 prompts_version: str = "v1", timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5,
                 max_parse_retries: int = 2, concurrency: int = 1) -> None:
        from fteval.backends.openai_http import OpenAIBackend

        super().__init__(prompts_version)
        if max_parse_retries < 0:
            raise ValueError(f"max_parse_retries={max_parse_retries} must be >= 0")
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY") or None
        self.backend = OpenAIBackend(base_url=base_url, models={"baseline": model} if model else None, api_key=api_key,
                                     endpoint="chat", system_prompt=self.prompts["system"], timeout_s=timeout_s,
                                     max_retries=max_retries, backoff_s=backoff_s, concurrency=concurrency,
                                     max_new_tokens=4, temperature=0.0)
        self.max_parse_retries = int(max_parse_retries)

    def _classify(self, responses: list[str], prompts: list[Optional[str]]) -> list[RefusalResult]:
        texts = [self._user(p, r) for p, r in zip(prompts, responses)]
        answers: list[Optional[str]] = [None] * len(texts)
        raw: list[str] = [""] * len(texts)
        todo = list(range(len(texts)))
        for _ in range(self.max_parse_retries + 1):
            try:
                results = self.backend.batch_generate([texts[i] for i in todo])
            except (BackendConnectionError, BackendTimeoutError) as exc:
                raise type(exc)(f"refusal judge: {exc}. Start the judge server, fix --base_url, or use --judge rules") from exc
            for i, res in zip(todo, results):
                raw[i] = res.text
                m = _ANSWER.match(res.text)
                if m:
                    answers[i] = m.group(1)
            todo = [i for i in todo if answers[i] is None]
            if not todo:
                break
        if todo:
            i = todo[0]
            raise BackendResponseError(
                f"refusal judge at {self.backend.base_url}: {len(todo)} response(s) got an answer that is not 1, 2 or 3 after "
                f"{self.max_parse_retries + 1} attempt(s) (first: item {i + 1}, answered {raw[i][:80]!r}); use a judge model "
                "that follows the instruction (a guard or instruction-tuned model), or --judge rules"
            )
        out = []
        for a in answers:
            probs = np.zeros(3)
            probs[int(a) - 1] = 1.0  # type: ignore[arg-type]
            out.append(result_from_probs(probs, 0.5, ("openai_judge",), self.name))
        return out


class HFJudge(_PromptedJudge):
    """A local causal LM judge: probabilities of the label tokens "1", "2", "3" after the prompt.

    Args:
        model / tokenizer: the judge; None loads ``model_name_or_path``.
        model_name_or_path: what to load when no model is given ('embedded', a folder, a hub id).
        prompts_version: which ``refusal_judge_<version>.json``.
        batch_size: prompts per forward pass.
        max_prompt_tokens / max_response_tokens: the request and the response are cut to this many tokens.
        template: chat formatting, as in :func:`fteval.data.formatting.format_prompt`.
        adapters_off: judge with the base model when given a PeftModel or GRIT layers.
    """

    name = "hf"

    def __init__(self, model=None, tokenizer=None, model_name_or_path: str = "embedded", prompts_version: str = "v1",
                 batch_size: int = 8, max_prompt_tokens: int = 256, max_response_tokens: int = 384, template: str = "auto",
                 adapters_off: bool = True) -> None:
        from fteval.eval.geval import GEvalJudge, score_token_ids

        super().__init__(prompts_version)
        if model is None:
            from fteval.models.loading import load_causal_lm

            loaded = load_causal_lm(model_name_or_path)
            model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None:
            raise ValueError("HFJudge got a model without its tokenizer; pass tokenizer=")
        self.tokenizer = tokenizer
        self.template = template
        # G-Eval's batched, left-padded next-token pass (adapters off when asked); its own prompts are unused here.
        self._runner = GEvalJudge(model, tokenizer, batch_size=batch_size, template=template, adapters_off=adapters_off)
        self.max_prompt_tokens, self.max_response_tokens = int(max_prompt_tokens), int(max_response_tokens)
        self.token_ids = score_token_ids(tokenizer, self._text("x", "y"))[:3]  # ids of "1", "2", "3"

    def _cut(self, text: str, n: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else self.tokenizer.decode(ids[:n]) + " [...]"

    def _text(self, prompt: Optional[str], response: str) -> str:
        from fteval.data.formatting import format_prompt

        head = format_prompt(self.tokenizer, self._user(prompt, response), self.template, system_prompt=self.prompts["system"])
        return head + self.prompts["answer_prefix"]

    def _classify(self, responses: list[str], prompts: list[Optional[str]]) -> list[RefusalResult]:
        texts = [self._text(self._cut(p, self.max_prompt_tokens) if p else None, self._cut(r, self.max_response_tokens))
                 for p, r in zip(prompts, responses)]
        logits = self._runner.next_token_logits(texts)[:, torch.tensor(self.token_ids)]  # [n, 3]
        probs = torch.softmax(logits.double(), dim=-1).numpy()  # [n, 3], renormalised over the label tokens
        return [result_from_probs(p, 0.5, ("hf_judge",), self.name) for p in probs]


def make_judge(judge: JudgeName = "rules", **options) -> RefusalJudge:
    """The judge called ``judge`` with its options (see each class); unknown names and options are errors."""
    classes = {"rules": RulesJudge, "openai": OpenAIJudge, "hf": HFJudge}
    if judge not in classes:
        raise ValueError(f"unknown refusal judge {judge!r}; choose one of {sorted(classes)}")
    try:
        return classes[judge](**options)
    except TypeError as exc:
        raise ValueError(f"refusal judge {judge!r}: {exc}; see its options in fteval/eval/refusal/judges.py") from exc
