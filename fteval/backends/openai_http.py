"""Generation through any OpenAI-compatible HTTP server (``openai`` backend).

Works with vLLM (``vllm serve``), Ollama (``/v1``), llama.cpp's server and llama-cpp-python's
(``python -m llama_cpp.server``): ``POST {base_url}/chat/completions`` (chat-formatted by the
server) or ``{base_url}/completions`` (``endpoint="completions"``, raw prompts), and
``GET {base_url}/models`` to find the served model. Standard library only (``urllib``).

Failures: each request has a timeout; connection errors, timeouts and HTTP 408/429/5xx are
retried ``max_retries`` times with exponential backoff (``backoff_s * 2**k``, capped at
``backoff_max_s``); then :class:`BackendConnectionError` or :class:`BackendTimeoutError` says
what happened and how to fix it. An answer that is not a completion (non-JSON body, no
``choices``, other HTTP errors) raises :class:`BackendResponseError` at once: retrying a
misconfigured URL or model name would only repeat it.

Variants: ``models`` maps variant names to served model names (vLLM serves LoRA adapters
under their own names: ``--lora-modules tuned=/path``). ``"baseline"`` defaults to the first
model the server lists. Memory is the server's business and is not measured here.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Optional

from fteval.backends.base import (
    BASELINE,
    BackendConnectionError,
    BackendResponseError,
    BackendTimeoutError,
    GenerationBackend,
    RawCompletion,
)

__all__ = ["OpenAIBackend"]

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_START_HINT = "start it (e.g. `python -m llama_cpp.server --model FILE.gguf --port 8000`, `vllm serve MODEL`) or fix base_url"


def _snippet(body: bytes, n: int = 200) -> str:
    text = body[:n].decode("utf-8", errors="replace")
    return repr(text) + ("..." if len(body) > n else "")


class OpenAIBackend(GenerationBackend):
    """Client of an OpenAI-compatible server.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        models: variant name -> served model name; ``"baseline"`` defaults to the first served model.
        api_key: sent as ``Authorization: Bearer``; None for local servers.
        endpoint: 'chat' (``/chat/completions``; the server applies the chat template) or
            'completions' (``/completions``; prompts sent as they are).
        system_prompt: optional system message ('chat' only).
        timeout_s: seconds to wait for each HTTP request (connect + answer).
        max_retries: extra attempts after a connection error, timeout or retryable HTTP status.
        backoff_s / backoff_max_s: first retry delay and its cap, seconds (doubling in between).
        concurrency: requests in flight at once (a server batches them; 1 = one after another).
        extra: further fields sent with every request, e.g. ``{repeat_penalty: 1.0}`` for llama.cpp's and
            Ollama's servers, whose default repetition penalty (1.1) departs from plain greedy decoding.
        max_new_tokens, temperature, top_p, seed: see :class:`GenerationBackend` (sent to the server).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        models: Optional[Mapping[str, str]] = None,
        api_key: Optional[str] = None,
        endpoint: Literal["chat", "completions"] = "chat",
        system_prompt: Optional[str] = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        concurrency: int = 1,
        extra: Optional[Mapping[str, Any]] = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint={endpoint!r} is not one of 'chat', 'completions'")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or int(concurrency) < 1:
            raise ValueError(
                f"need timeout_s > 0, max_retries >= 0, backoff_s >= 0 and concurrency >= 1; got {timeout_s}, "
                f"{max_retries}, {backoff_s}, {concurrency}"
            )
        self.base_url = base_url.rstrip("/")
        self.models = dict(models or {})
        self.api_key = api_key
        self.endpoint = endpoint
        self.system_prompt = system_prompt
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.concurrency = int(concurrency)
        self.extra = dict(extra or {})
        self._default_model: Optional[str] = None

    @property
    def variants(self) -> list[str]:
        return [BASELINE, *(m for m in self.models if m != BASELINE)]

    def describe(self, variant: str) -> str:
        """The served model name of ``variant`` (the server's first model for an unnamed baseline) at ``base_url``."""
        return f"{self.models.get(self.check_variant(variant), 'first served model')} at {self.base_url}"

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, payload: Optional[dict] = None) -> Any:
        """One JSON request with timeout and bounded retries; returns the parsed JSON body."""
        url = f"{self.base_url}{path}"
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        failure: tuple[str, str] = ("", "")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as exc:
                body = exc.read() or b""
                if exc.code in _RETRY_STATUS:
                    failure = ("http", f"HTTP {exc.code} {_snippet(body)}")
                    continue
                raise BackendResponseError(
                    f"{method} {url} answered HTTP {exc.code}: {_snippet(body, 400)}; check the model name "
                    f"({self.models or 'server default'}), base_url and api_key"
                ) from exc
            except TimeoutError:
                failure = ("timeout", f"no answer within {self.timeout_s:g} s")
                continue
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    failure = ("timeout", f"no answer within {self.timeout_s:g} s")
                else:
                    failure = ("connection", str(exc.reason))
                continue
            except (ConnectionError, http.client.IncompleteRead) as exc:
                failure = ("connection", f"{type(exc).__name__}: {exc}")
                continue
            except http.client.HTTPException as exc:  # not HTTP at all (BadStatusLine, ...)
                raise BackendResponseError(
                    f"{method} {url} did not answer with HTTP ({type(exc).__name__}: {exc}); "
                    "is base_url an OpenAI-compatible server?"
                ) from exc
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BackendResponseError(
                    f"{method} {url} returned a body that is not JSON ({_snippet(body)}); "
                    "is base_url the server's OpenAI-compatible root (usually ending in /v1)?"
                ) from exc
        kind, detail = failure
        if kind == "timeout":
            raise BackendTimeoutError(
                f"{method} {url}: {detail}, {attempts} attempt(s); the server is overloaded or the generation is "
                "too long: raise timeout_s, lower max_new_tokens, or check the server"
            )
        if kind == "http":
            raise BackendResponseError(f"{method} {url} kept failing ({detail}) after {attempts} attempt(s); check the server's log")
        raise BackendConnectionError(f"cannot reach the server at {url} ({detail}) after {attempts} attempt(s); {_START_HINT}")

    def list_models(self) -> list[str]:
        """Ids the server serves (``GET /models``)."""
        body = self._request("GET", "/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
            raise BackendResponseError(f"GET {self.base_url}/models returned no model list ({str(body)[:200]!r})")
        return [str(m["id"]) for m in data]

    def served_name(self, variant: str) -> str:
        """The model name sent for ``variant``."""
        self.check_variant(variant)
        if variant in self.models:
            return self.models[variant]
        if self._default_model is None:
            served = self.list_models()
            if not served:
                raise BackendResponseError(f"the server at {self.base_url} serves no model; load one, or set models=")
            self._default_model = served[0]
        return self._default_model

    # ------------------------------------------------------------------ generation
    def _one(self, prompt: str, model_name: str) -> RawCompletion:
        payload: dict[str, Any] = {
            "model": model_name,
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            **self.extra,
        }
        if self.endpoint == "chat":
            payload["messages"] = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
                {"role": "user", "content": prompt}
            ]
            path = "/chat/completions"
        else:
            payload["prompt"] = prompt
            path = "/completions"
        start = time.perf_counter()
        body = self._request("POST", path, payload)
        latency = time.perf_counter() - start
        url = f"{self.base_url}{path}"
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendResponseError(f"POST {url} returned JSON without a 'choices' list: {str(body)[:200]!r}")
        choice = choices[0]
        if self.endpoint == "chat":
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if text is not None and not isinstance(text, str):
            text = None
        if text is None and choice.get("finish_reason") is None:
            raise BackendResponseError(f"POST {url} returned a choice without text: {str(choice)[:200]!r}")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return RawCompletion(
            text=(text or "").strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),  # 0 when the server reports no usage
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
            latency_s=latency,
        )

    def _generate(self, prompts: list[str], model: str) -> list[RawCompletion]:
        name = self.served_name(model)
        if self.concurrency == 1 or len(prompts) == 1:
            return [self._one(p, name) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, name), prompts))

    def _memory(self) -> tuple[Optional[int], str]:
        return None, "not_measured"
