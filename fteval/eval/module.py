"""AQIEvaluator: the ``fteval test`` loop. Baseline and tuned adapters on the same prompts, in one pass.

For every test batch each variant runs once: ``baseline`` is the base model with every adapter
switched off (peft's ``disable_adapter``), then each named adapter is activated in turn. Hidden
states of all layers are token-pooled per layer (:func:`fteval.eval.pooling.pool_layers`) and kept
in a torchmetrics state per variant, so DDP ranks are gathered before anything is computed and
1 or N devices give the same numbers. With ``behaviour`` on, some prompts also get answers, refusal
labels and G-Eval scores per variant.

At the end of the epoch the loop hands what it collected to pure functions and writers:
:mod:`fteval.eval.results` (scores, intervals, every pair of models compared, behaviour),
:mod:`fteval.eval.summary` (the printed block) and :mod:`fteval.eval.outputs` (the results folder
and the run's experiment database).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch

from fteval.backends.base import BASELINE, generation_metrics
from fteval.data.sampling import SOURCE_ROW
from fteval.db.values import redact_secrets
from fteval.eval.collectors import BehaviourCollector, RepresentationCollector
from fteval.eval.headtohead import SUMMARY_METRICS
from fteval.eval.metrics import DEFAULT_LAMBDA
from fteval.eval.outputs import record_results, write_results_files
from fteval.eval.pooling import TOKEN_SELECTIONS, LayerPooling, SinkMode, TokenSelection, last_tokens_mask, pool_layers
from fteval.eval.refusal.detector import MODEL_CLASSES
from fteval.eval.results import SummarySettings, embedding_tensors, summarise, summarise_behaviour
from fteval.eval.summary import format_summary
from fteval.io import check_adapter_folder
from fteval.models.dense4bit import dense_4bit_inference, fits_in_memory
from fteval.models.loading import Quantization, load_causal_lm

log = logging.getLogger(__name__)


def _read_adapter_base(path: Path) -> Optional[str]:
    run = path / "fteval_run.json"
    if run.is_file():
        return json.loads(run.read_text()).get("base_model")
    cfg = json.loads((path / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path")


class AQIEvaluator(L.LightningModule):
    """AQI evaluation of a base model and any number of adapters on the safety evaluation set.

    Args:
        model_name_or_path: base model ('embedded', a folder or a hub id).
        quantization: load the base in 'nf4'/'fp4' (as QLoRA trained it) or 'none'.
        adapters: name -> PEFT adapter folder (QLoRA and GRIT exports alike); empty: baseline only.
        tokens: which positions of each prompt are averaged: 'prompt' (every prompt token, the sink
            handled by ``sink``) or 'post_instruction' (only the tokens the chat template appends after
            the user's message, where the model decides whether to answer; docs/evaluation.md).
        sink: attention-sink handling in token pooling ('first', 'none', 'auto'); with
            ``tokens='post_instruction'`` no sink token is among the pooled positions.
        layer_pooling: how layers combine into one vector per prompt ('attention', 'mean', 'last').
        layers: restrict layer pooling to these hidden-state indices (0 = embeddings); default all.
        lam: AQI weight lambda (the spec: 0.5).
        statistics: 'jackknife' (default: bias-corrected scores, closed-form jackknife intervals and
            tests, calibrated in docs/statistics.md) or 'bootstrap' (the spec's procedures: percentile
            bootstrap intervals of the plug-in scores from ``n_bootstrap`` resamples, paired t-tests of
            the Deltas on their bootstrap standard error, Cohen's d; measured beside the default by
            ``fteval bench stats --methods``, where its intervals miss the population values).
        n_bootstrap: 0 turns the intervals and tests off; otherwise the resamples of
            ``statistics: bootstrap`` (the jackknife draws none).
        bootstrap_seed: seed of the bootstrap resamples (``statistics: bootstrap``).
        confidence: confidence level of the intervals.
        correction: multiple-comparison correction over the reported p-values ('holm' or 'bh').
        results_dir: where aqi_results.json and the embeddings are written.
        save_embeddings: write pooled embeddings (and per-layer representations) as safetensors.
        attn_implementation: 'auto', 'sdpa', 'eager', 'flash_attention_2'.
        cache_dir: embedded-model cache.
        behaviour: also generate responses (greedy) for a subset of prompts and report refusal and
            over-refusal rates and G-Eval scores (the baseline model, adapters off, is the judge).
        behaviour_prompts_per_class: prompts per class that get responses (the first by index).
        max_new_tokens: generation length for the behavioural evaluation.
        behaviour_backend: what generates the answers: 'hf' (the evaluated model, default), 'llamacpp' (the
            base GGUF plus each adapter's LoRA GGUF from ``fteval export``) or 'openai' (an OpenAI-compatible
            server, one served name per variant); AQI stays on the HF model (:mod:`fteval.eval.serving`).
        behaviour_backend_options: that backend's options, e.g. ``{gguf: BASE.gguf, adapters: {qlora: X.gguf}}``
            for 'llamacpp', ``{base_url: http://HOST:PORT/v1, models: {baseline: B, qlora: Q}}`` for 'openai'.
        geval: run the G-Eval judge on the responses (helpfulness, harmlessness, instruction following).
        refusal_judge: who labels each answer as compliance / partial / full refusal: 'rules' (the fitted
            detector, offline), 'openai' (a judge model on an OpenAI-compatible server) or 'hf' (a local
            causal LM's label-token probabilities; default the evaluated base model, adapters off).
        refusal_judge_options: the judge's options (``fteval.eval.refusal.judges``), e.g. ``{base_url: ...,
            model: ...}`` for 'openai', ``{model_name_or_path: ...}`` for 'hf'. The 'openai' judge's key is
            best given as the ``OPENAI_API_KEY`` environment variable; an ``api_key`` here is used but kept
            out of every file (hparams, TensorBoard, config.yaml and the database hold ``<redacted>``).
        db_path: not accepted (an error names the fix). Scores go to the run's experiment database: the
            one of ``callbacks.run_logger.ExperimentDBLogger`` in the trainer's callbacks, which creates the
            experiment and hands this module ``experiment_db_path``; without that callback nothing is
            recorded. A second database setting here could send scores to a database without the experiment.
    """

    method_name = "aqi_eval"

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        quantization: Quantization = "none",
        adapters: Optional[dict[str, str]] = None,
        tokens: TokenSelection = "prompt",
        sink: SinkMode = "first",
        layer_pooling: LayerPooling = "attention",
        layers: Optional[list[int]] = None,
        lam: float = DEFAULT_LAMBDA,
        statistics: Literal["jackknife", "bootstrap"] = "jackknife",
        n_bootstrap: int = 1000,
        bootstrap_seed: int = 0,
        confidence: float = 0.95,
        correction: Literal["holm", "bh"] = "holm",
        results_dir: str = "output/m06_comprehensive_evaluation",
        save_embeddings: bool = True,
        attn_implementation: str = "auto",
        cache_dir: Optional[str] = None,
        behaviour: bool = True,
        behaviour_prompts_per_class: int = 50,
        max_new_tokens: int = 64,
        behaviour_backend: Literal["hf", "llamacpp", "openai"] = "hf",
        behaviour_backend_options: Optional[dict] = None,
        geval: bool = True,
        refusal_judge: Literal["rules", "openai", "hf"] = "rules",
        refusal_judge_options: Optional[dict] = None,
        db_path: Optional[str] = None,
    ):
        super().__init__()
        if db_path is not None:
            raise ValueError(
                f"model.init_args.db_path={db_path!r} is no longer accepted: fteval test records its scores in the "
                "run's database, the db_path of the callbacks.run_logger.ExperimentDBLogger callback (as fit does); "
                "remove db_path from the model's init_args and set it on that callback"
            )
        adapters = dict(adapters or {})
        if BASELINE in adapters:
            raise ValueError(f"adapter name {BASELINE!r} is reserved for the base model; rename that adapter")
        if n_bootstrap < 0:
            raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 0")
        if tokens not in TOKEN_SELECTIONS:
            raise ValueError(f"tokens={tokens!r}: use 'prompt' (mean over the prompt's tokens) or 'post_instruction' "
                             "(the tokens the chat template adds after the user's message)")
        self.save_hyperparameters(ignore=["db_path"])
        # Credentials stay in memory: the saved hyperparameters (hparams.yaml, TensorBoard, checkpoints) are redacted.
        options = dict(refusal_judge_options or {})
        redacted = redact_secrets(options)
        self._judge_secrets = {k: v for k, v in options.items() if redacted.get(k) != v}
        if self._judge_secrets:
            self.hparams["refusal_judge_options"] = redacted
            self._hparams_initial["refusal_judge_options"] = redacted
        self.settings = SummarySettings(tokens=tokens, sink=sink, layer_pooling=layer_pooling, layers=layers, lam=lam,
                                        intervals=bool(n_bootstrap), confidence=confidence, correction=correction,
                                        method=statistics, n_bootstrap=max(n_bootstrap, 1), seed=bootstrap_seed)
        self.adapters = adapters
        self.variants = [BASELINE, *adapters]
        self.collectors = torch.nn.ModuleDict({v: RepresentationCollector() for v in self.variants})
        self.behaviour_collector = BehaviourCollector()
        self.responses: list[dict] = []  # this rank's generated responses (rank zero gathers them)
        self._behaviour_indices: set[int] = set()
        self._backend = None
        self._dense: Optional[contextlib.ExitStack] = None
        self._judge = None
        self._refusal_judge = None
        self.model = None
        self.tokenizer = None
        self.results: dict = {}
        self.experiment_id: Optional[int] = None  # set by callbacks.run_logger.ExperimentDBLogger
        self.experiment_db_path: Optional[str] = None  # the database that experiment is in (same logger)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        for name, path in self.adapters.items():
            p = Path(path)
            try:
                check_adapter_folder(p)
            except (FileNotFoundError, ValueError) as exc:
                raise type(exc)(f"adapter {name!r}: {exc}; run `python -m fteval fit` first or fix the path") from None
            base = _read_adapter_base(p)
            if base is not None and base != hp.model_name_or_path:
                raise ValueError(
                    f"adapter {name!r} at {path} was trained on {base!r}, but this evaluation loads "
                    f"{hp.model_name_or_path!r}; set model.init_args.model_name_or_path to {base!r}"
                )
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        loaded = load_causal_lm(hp.model_name_or_path, quantization=hp.quantization,
                                attn_implementation=hp.attn_implementation,
                                cache_dir=Path(hp.cache_dir) if hp.cache_dir else None, device=device)
        model, self.tokenizer = loaded.model, loaded.tokenizer
        model.config.use_cache = False
        if self.adapters:
            from peft import PeftModel

            names = list(self.adapters)
            try:
                model = PeftModel.from_pretrained(model, self.adapters[names[0]], adapter_name=names[0])
                for name in names[1:]:
                    model.load_adapter(self.adapters[name], adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ValueError(
                    f"could not attach the adapters {self.adapters} to {hp.model_name_or_path!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); they were probably trained on "
                    "another base model"
                ) from exc
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval()

    @contextlib.contextmanager
    def variant(self, name: str):
        """Run the model as ``name``: 'baseline' (all adapters off) or one adapter."""
        if not self.adapters:
            yield self.model
            return
        if name == BASELINE:
            with self.model.disable_adapter():
                yield self.model
            return
        self.model.set_adapter(name)
        yield self.model

    # ------------------------------------------------------------------- loop
    def on_test_start(self) -> None:
        hp = self.hparams
        self._dense = contextlib.ExitStack()
        if fits_in_memory(self.model):
            self._dense.enter_context(dense_4bit_inference(self.model))  # CPU 4-bit base: dequantised once, same outputs
        if not hp.behaviour:
            return
        from fteval.eval.serving import behaviour_backend

        records = self.trainer.datamodule.eval_records
        for label in (0, 1):
            chosen = [r["index"] for r in records if r["label"] == label][: hp.behaviour_prompts_per_class]
            self._behaviour_indices.update(chosen)
        dm = self.trainer.datamodule.hparams
        self._backend = behaviour_backend(hp.behaviour_backend, hp.behaviour_backend_options, model=self.model,
                                          tokenizer=self.tokenizer, model_name_or_path=hp.model_name_or_path,
                                          adapters=self.adapters, batch_size=dm.eval_batch_size,
                                          max_new_tokens=hp.max_new_tokens, template=dm.template,
                                          system_prompt=dm.system_prompt)
        if hp.geval:
            from fteval.eval.geval import GEvalJudge

            self._judge = GEvalJudge(self.model, self.tokenizer, adapters_off=True)
        from fteval.eval.refusal import make_judge

        options = {**(hp.refusal_judge_options or {}), **self._judge_secrets}
        if hp.refusal_judge == "hf" and "model" not in options and "model_name_or_path" not in options:
            options.update(model=self.model, tokenizer=self.tokenizer, adapters_off=True)
        self._refusal_judge = make_judge(hp.refusal_judge, **options)

    def _behaviour_step(self, batch: dict) -> None:
        records = self.trainer.datamodule.eval_records
        idx = [int(i) for i in batch["index"] if int(i) in self._behaviour_indices]
        if not idx:
            return
        prompts = [records[i].get("message", records[i]["prompt"]) for i in idx]  # as cut to the token limit
        criteria = list(self._judge.criteria) if self._judge is not None else []
        for v, name in enumerate(self.variants):
            results = self._backend.batch_generate(prompts, model=name)
            texts = [r.text for r in results]
            refusals = self._refusal_judge.classify(texts, prompts)
            geval = torch.full((len(idx), max(len(criteria), 1)), float("nan"), dtype=torch.float64)
            for c, crit in enumerate(criteria):
                for j, sc in enumerate(self._judge.score(prompts, texts, crit)):
                    geval[j, c] = sc.score
            self.behaviour_collector.update(
                torch.tensor(idx, device=self.device), torch.full((len(idx),), v, device=self.device),
                torch.tensor([MODEL_CLASSES.index(r.label) for r in refusals], device=self.device),
                geval.to(self.device), torch.tensor([r.completion_tokens for r in results], device=self.device))
            self.responses += [{"model": name, "prompt_id": str(i), "prompt": records[i]["prompt"], "response": t,
                                "safety_label": "unsafe" if records[i]["label"] else "safe", "axiom": records[i]["axiom"],
                                "source_row": records[i].get(SOURCE_ROW),
                                "refusal_label": r.label, "refusal_judge": self._refusal_judge.name, "backend": g.backend,
                                "latency_s": g.latency_s,
                                "n_tokens": g.completion_tokens}
                               for i, t, r, g in zip(idx, texts, refusals, results)]

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.hparams.behaviour:
            self._behaviour_step(batch)
        for name in self.variants:
            with torch.no_grad(), self.variant(name) as model:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                            logits_to_keep=1)  # only the hidden states are read: no [B, seq, vocab] logits
            reps = self._pool(out.hidden_states, batch)  # [B, L+1, D]
            if not torch.isfinite(reps).all():
                raise ValueError(
                    f"variant {name!r} produced NaN/inf hidden states in batch {batch_idx}; check the adapter "
                    "and the precision (fp16 overflow); evaluate in bf16 or fp32"
                )
            self.collectors[name].update(reps, batch["safety_label"], batch["index"])

    def _pool(self, hidden_states, batch: dict) -> torch.Tensor:
        """Token-pool every layer over the positions ``tokens`` selects."""
        if self.hparams.tokens == "prompt":
            return pool_layers(hidden_states, batch["attention_mask"], sink=self.hparams.sink)
        counts = batch.get("suffix_tokens")
        if counts is None or not bool((torch.as_tensor(counts) > 0).all()):
            raise ValueError(
                "tokens='post_instruction' needs the number of tokens the prompt format adds after the user's "
                "message, and this evaluation set's format adds none (or its batches do not carry "
                "'suffix_tokens'); evaluate with tokens='prompt'"
            )
        return pool_layers(hidden_states, last_tokens_mask(batch["attention_mask"], counts), sink="none")

    def on_test_end(self) -> None:
        if self._dense is not None:
            self._dense.close()
            self._dense = None

    def on_test_epoch_end(self) -> None:
        data = {name: self.collectors[name].compute() for name in self.variants}
        hp = self.hparams
        self.results = summarise(data, hp.model_name_or_path, self.adapters, self.settings)
        if hp.behaviour:
            criteria = list(self._judge.criteria) if self._judge is not None else []
            summarise_behaviour(self.results, self.behaviour_collector.compute(), data[BASELINE], criteria, self.settings)
            self.behaviour_collector.reset()
            self.results["inference"] = self._inference_summary()
            for name, entry in self.results["inference"].items():  # who answered, for the printed summary
                self.results["models"][name]["generation"] = {"backend": entry["details"]["backend"],
                                                              "served": entry["details"]["served"],
                                                              "tokens_per_s": entry["metrics"]["tokens_per_s"]}
            self._gather_responses()
        records = self.trainer.datamodule.eval_records
        order = [int(i) for i in data[BASELINE][2].tolist()]
        self.results["prompts"] = [{"index": i, SOURCE_ROW: records[i].get(SOURCE_ROW)} for i in order]
        for name in self.variants:
            for m in SUMMARY_METRICS:
                self.log(f"test/{name}/{m}", self.results["models"][name]["scores"][m], sync_dist=False)
        for name in self.adapters:
            self.log(f"test/{name}/delta_aqi", self.results["deltas"][name]["aqi"]["delta"], sync_dist=False)
        for c in self.collectors.values():
            c.reset()
        if self.trainer.is_global_zero:
            embeddings = embedding_tensors(data, self.settings) if hp.save_embeddings else None
            if embeddings is not None and all(p[SOURCE_ROW] is not None for p in self.results["prompts"]):
                embeddings[SOURCE_ROW] = torch.tensor([p[SOURCE_ROW] for p in self.results["prompts"]], dtype=torch.int64)
            write_results_files(hp.results_dir, self.results, embeddings, self.responses)
            if self.experiment_id is not None and self.experiment_db_path:
                record_results(self.experiment_db_path, self.experiment_id, self.results, self.responses)
            print(format_summary(self.results))

    def _inference_summary(self) -> dict[str, dict]:
        """Per variant, the speed of the behaviour generation (this rank's calls): :func:`generation_metrics` plus the
        backend and the settings it ran with; recorded as that backend's ``inference_benchmarks`` rows."""
        out = {}
        device = str(self.device.type)
        for name in self.variants:
            calls = [r for r in self._backend.records if r.model == name]
            if not calls:
                continue
            latencies = [row["latency_s"] for row in self.responses if row["model"] == name]
            metrics = generation_metrics(sum(r.completion_tokens for r in calls), sum(r.wall_s for r in calls), latencies,
                                         [r.memory_bytes for r in calls])
            out[name] = {"metrics": {k: v for k, v in metrics.items() if v is not None},
                         "details": {"source": "fteval test (behaviour generation, greedy)", "backend": self._backend.name,
                                     "served": self._backend.describe(name),
                                     "device": device if self._backend.name == "hf" else None,  # llama.cpp/server: their own
                                     "n_prompts": sum(r.n_prompts for r in calls), "calls": len(calls),
                                     "completion_tokens": sum(r.completion_tokens for r in calls),
                                     "max_new_tokens": self.hparams.max_new_tokens,
                                     "batch_size": getattr(self._backend, "batch_size", 1), "memory_kind": calls[-1].memory_kind}}
        return out

    def _gather_responses(self) -> None:
        """Every rank's responses on every rank, each (model, prompt) once (a padding sampler repeats prompts)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.responses)
            seen, merged = set(), []
            for part in gathered:
                for row in part:
                    if (row["model"], row["prompt_id"]) not in seen:
                        seen.add((row["model"], row["prompt_id"]))
                        merged.append(row)
            self.responses = merged
