"""In-process generation with transformers (``hf`` backend), with PEFT adapters as variants.

The model is either loaded here (:func:`fteval.models.loading.load_causal_lm`; nf4 4-bit on a GPU
by default) or passed in already loaded (the test loop passes its PeftModel or its model with GRIT
layers). Variants: ``"baseline"`` runs with every adapter switched off (:func:`adapters_disabled`),
any other name runs that PEFT adapter (or, for a model carrying GRIT layers, ``"default"`` runs
them on).

Prompts are chat-formatted with :func:`fteval.data.formatting.format_prompt` unless ``raw=True``,
sorted by length, cut into batches of ``batch_size`` and LEFT-padded, so every row's last prompt
token sits at the same position and generation continues from it. A completion's latency is
the wall time of its batch's ``generate`` call.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch import nn

from fteval.backends.base import BASELINE, GenerationBackend, RawCompletion, process_rss_bytes
from fteval.data.formatting import Template, format_prompt, pad_batch

__all__ = ["GRIT_VARIANT", "HFBackend", "adapters_disabled", "is_peft_model"]

GRIT_VARIANT = "default"  # variant name of the adapter carried by GRIT layers (peft's default adapter name)


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _grit_layers(model: nn.Module) -> list[nn.Module]:
    from fteval.grit import GritLoraLinear

    return [m for m in model.modules() if isinstance(m, GritLoraLinear)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block: PEFT's ``disable_adapter()`` for a
    PeftModel, ``adapter_enabled = False`` on every GRIT layer otherwise; restored afterwards.
    A model without adapters is yielded unchanged; ``requires_grad`` flags are left as they were."""
    if is_peft_model(model):
        # peft re-enables adapters on exit through set_adapter, which also makes them trainable:
        # put every requires_grad flag back as it was.
        grads = [(p, p.requires_grad) for p in model.parameters()]
        try:
            with model.disable_adapter():
                yield model
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
        return
    layers = _grit_layers(model)
    saved = [layer.adapter_enabled for layer in layers]
    try:
        for layer in layers:
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, flag in zip(layers, saved):
            layer.adapter_enabled = flag


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation config names none; set one")
    return ids


class HFBackend(GenerationBackend):
    """transformers ``generate`` in this process.

    Args:
        model: 'embedded', a local folder or a hub id (loaded here), or an already loaded causal LM
            (then ``tokenizer`` is required).
        tokenizer: the tokenizer of an already loaded model.
        adapters: variant name -> PEFT adapter folder (``adapter_config.json`` + weights), loaded
            with ``PeftModel.from_pretrained`` / ``load_adapter`` under that name.
        quantization: 'auto' (nf4 on a GPU, none on CPU), 'none', 'nf4' or 'fp4'; only used when
            the model is loaded here.
        batch_size: prompts per ``generate`` call.
        raw: send prompts as they are instead of chat-formatting them.
        template / system_prompt: passed to ``format_prompt``.
        cache_dir: where the embedded model is materialised.
        cache_implementation: 'dynamic' (a KV cache that grows per token) or 'static' (one of fixed size
            per ``generate`` call; on a GPU transformers then compiles the decoding step). Greedy answers
            are the same up to floating-point differences between the two kernels' orders.
        max_new_tokens, temperature, top_p, seed: see :class:`GenerationBackend`.
    """

    name = "hf"

    def __init__(
        self,
        model: Union[str, nn.Module] = "embedded",
        tokenizer=None,
        adapters: Optional[Mapping[str, Union[str, Path]]] = None,
        quantization: Literal["auto", "none", "nf4", "fp4"] = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        raw: bool = False,
        template: Template = "auto",
        system_prompt: Optional[str] = None,
        cache_dir: Optional[Path] = None,
        cache_implementation: Literal["dynamic", "static"] = "dynamic",
    ) -> None:
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation={cache_implementation!r} is not one of 'dynamic', 'static'")
        if quantization not in ("auto", "none", "nf4", "fp4"):
            raise ValueError(f"quantization={quantization!r} is not one of 'auto', 'none', 'nf4', 'fp4'")
        self.batch_size = int(batch_size)
        self.cache_implementation = cache_implementation
        self.raw = bool(raw)
        self.template: Template = template
        self.system_prompt = system_prompt
        if isinstance(model, (str, Path)):
            from fteval.models.loading import load_causal_lm

            if quantization == "auto":
                quantization = "nf4" if torch.cuda.is_available() else "none"
            loaded = load_causal_lm(str(model), quantization=quantization, cache_dir=cache_dir)
            model, tokenizer = loaded.model, loaded.tokenizer
        elif tokenizer is None:
            raise ValueError("HFBackend got a loaded model but no tokenizer; pass tokenizer=... as well")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.model = self._attach(model, dict(adapters or {}))
        self.eos_ids = _eos_ids(self.model, tokenizer)
        self._grit = bool(_grit_layers(self.model)) and not is_peft_model(self.model)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _attach(model: nn.Module, adapters: dict[str, Union[str, Path]]) -> nn.Module:
        if not adapters:
            return model
        if _grit_layers(model):
            raise ValueError(
                "cannot attach PEFT adapters to a model that carries GRIT layers; export the GRIT adapter "
                "(PEFT format) and pass it in adapters= together with the plain base model"
            )
        from peft import PeftModel

        for name, path in adapters.items():
            path = Path(path)
            if name == BASELINE:
                raise ValueError(f"adapter name {BASELINE!r} is reserved for the model without adapters; rename it")
            if not (path / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"adapter {name!r}: {path} is not a PEFT adapter folder (no adapter_config.json); "
                    "pass the folder written by fit's adapter export or save_pretrained"
                )
            if is_peft_model(model):
                if name in model.peft_config:
                    raise ValueError(f"adapter name {name!r} is already loaded on the model; choose another name")
                model.load_adapter(str(path), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        return model

    @property
    def variants(self) -> list[str]:
        if is_peft_model(self.model):
            return [BASELINE, *self.model.peft_config]
        if self._grit:
            return [BASELINE, GRIT_VARIANT]
        return [BASELINE]

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        return device if isinstance(device, torch.device) else next(self.model.parameters()).device

    @contextmanager
    def _variant(self, name: str) -> Iterator[None]:
        if name == BASELINE:
            with adapters_disabled(self.model):
                yield
            return
        if self._grit:  # GRIT layers on, whatever they were
            layers = _grit_layers(self.model)
            saved = [layer.adapter_enabled for layer in layers]
            try:
                for layer in layers:
                    layer.adapter_enabled = True
                yield
            finally:
                for layer, flag in zip(layers, saved):
                    layer.adapter_enabled = flag
            return
        # peft's set_adapter also flips requires_grad of adapter weights: put everything back afterwards.
        previous = self.model.active_adapter
        grads = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self.model.set_adapter(name)
            yield
        finally:
            self.model.set_adapter(previous)
            for p, flag in grads:
                p.requires_grad_(flag)

    # ------------------------------------------------------------------ generation
    def _generation_config(self):
        from transformers import GenerationConfig

        kwargs: dict = dict(
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
            use_cache=True,
        )
        if self.cache_implementation == "static":
            # one KV cache of fixed size for the whole call: on a GPU transformers compiles the decoding step
            # (with CUDA graphs) once per batch shape instead of running it op by op
            kwargs["cache_implementation"] = "static"
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**kwargs)

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        if self.raw:
            return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        texts = [format_prompt(self.tokenizer, p, self.template, self.system_prompt) for p in prompts]
        # The chat template already writes the special tokens (BOS / headers).
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _generate(self, prompts: list[str], model: str) -> list[RawCompletion]:
        encoded = self._encode(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # less padding per batch
        out: list[Optional[RawCompletion]] = [None] * len(prompts)
        cfg = self._generation_config()
        device = self.device
        if self.temperature > 0:
            torch.manual_seed(self.seed)
        with self._variant(model), _eval_mode(self.model), torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                # a static cache is compiled per shape: prompt widths in steps of 64 bound the shapes
                batch = pad_batch([{"input_ids": encoded[i]} for i in chunk], self.tokenizer.pad_token_id, side="left",
                                  multiple_of=64 if self.cache_implementation == "static" else 1)
                ids = batch["input_ids"].to(device)  # [batch, seq]
                mask = batch["attention_mask"].to(device)  # [batch, seq]
                start_time = time.perf_counter()
                generated = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                latency = time.perf_counter() - start_time  # seconds until this batch's completions were ready
                new = generated[:, ids.shape[1] :].tolist()  # [batch, <= max_new_tokens]
                for row, i in zip(new, chunk):
                    stop = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
                    tokens = row if stop is None else row[:stop]
                    out[i] = RawCompletion(
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                        prompt_tokens=len(encoded[i]),
                        completion_tokens=len(tokens),
                        finish_reason="length" if stop is None else "stop",
                        latency_s=latency,
                    )
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ memory
    def _before_call(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _memory(self) -> tuple[Optional[int], str]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        return process_rss_bytes(), "process_rss"

    def close(self) -> None:
        cuda = self.device.type == "cuda"
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
