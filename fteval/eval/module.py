"""AQIEvaluator: the ``fteval test`` loop. Baseline and tuned adapters on the same prompts, in one pass.

For every test batch each variant runs once: ``baseline`` is the base model with every adapter
switched off (peft's ``disable_adapter``), then each named adapter is activated in turn. Hidden
states of all layers are token-pooled per layer (:func:`fteval.eval.pooling.pool_layers`) and kept
in a torchmetrics state per variant, so DDP ranks are gathered before anything is computed and
1 or N devices give the same numbers. At the end of the epoch: layer pooling, AQI/XBI/CHI/DB/Dunn
(:mod:`fteval.eval.metrics`), bias-corrected scores with jackknife intervals
(:mod:`fteval.eval.separation`), and every pair of models compared on the same prompts
(:mod:`fteval.eval.headtohead`: paired Deltas, McNemar tests of refusals, G-Eval t-tests, power),
each p-value family Holm- (or BH-) adjusted. The summary block is printed, logged as test metrics
and written as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from torch import Tensor

from fteval.io import check_adapter_folder, write_json_atomic
from fteval.eval.collectors import REFUSAL_CODES, BehaviourCollector, RepresentationCollector
from fteval.eval.metrics import DEFAULT_LAMBDA, cluster_scores, layer_profile
from fteval.eval.pooling import LayerPooling, SinkMode, layer_attention_weights, pool_layers, pool_over_layers
from fteval.eval.summary import format_summary
from fteval.eval.headtohead import (
    behaviour_comparison,
    correct_families,
    embedding_comparison,
    pair_key,
    pairs,
    store_tests,
)
from fteval.eval.separation import separation_intervals
from fteval.eval.stats import per_prompt_separation
from fteval.models.loading import Quantization, load_causal_lm

log = logging.getLogger(__name__)

BASELINE = "baseline"
SUMMARY_METRICS = ("aqi", "aqi_bounded", "xbi", "chi")
INTERVAL_METHOD = "bias-corrected separation, closed-form jackknife (docs/statistics.md)"


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
        sink: attention-sink handling in token pooling ('first', 'none', 'auto').
        layer_pooling: how layers combine into one vector per prompt ('attention', 'mean', 'last').
        layers: restrict layer pooling to these hidden-state indices (0 = embeddings); default all.
        lam: AQI weight lambda (the spec: 0.5).
        n_bootstrap: 0 turns the intervals and tests off; any other value keeps them on (they are
            closed-form jackknife intervals, docs/statistics.md, and draw no resamples).
        bootstrap_seed: kept for existing configs; the closed-form intervals draw nothing random.
        confidence: confidence level of the intervals.
        correction: multiple-comparison correction over the reported p-values ('holm' or 'bh').
        results_dir: where aqi_results.json and the embeddings are written.
        db_path: experiment database; scores are recorded there when the run has an experiment row
            (``callbacks.run_logger.ExperimentDBLogger`` in the trainer's callbacks creates it).
        save_embeddings: write pooled embeddings (and per-layer representations) as safetensors.
        attn_implementation: 'auto', 'sdpa', 'eager', 'flash_attention_2'.
        cache_dir: embedded-model cache.
        behaviour: also generate responses (greedy) for a subset of prompts and report refusal and
            over-refusal rates and G-Eval scores (the baseline model, adapters off, is the judge).
        behaviour_prompts_per_class: prompts per class that get responses (the first by index).
        max_new_tokens: generation length for the behavioural evaluation.
        geval: run the G-Eval judge on the responses (helpfulness, harmlessness, instruction following).
        refusal_judge: who labels each answer as compliance / partial / full refusal: 'rules' (the fitted
            detector, offline), 'openai' (a judge model on an OpenAI-compatible server) or 'hf' (a local
            causal LM's label-token probabilities; default the evaluated base model, adapters off).
        refusal_judge_options: the judge's options (``fteval.eval.refusal.judges``), e.g. ``{base_url: ...,
            model: ...}`` for 'openai', ``{model_name_or_path: ...}`` for 'hf'.
    """

    method_name = "aqi_eval"

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        quantization: Quantization = "none",
        adapters: Optional[dict[str, str]] = None,
        sink: SinkMode = "first",
        layer_pooling: LayerPooling = "attention",
        layers: Optional[list[int]] = None,
        lam: float = DEFAULT_LAMBDA,
        n_bootstrap: int = 1000,
        bootstrap_seed: int = 0,
        confidence: float = 0.95,
        correction: Literal["holm", "bh"] = "holm",
        results_dir: str = "output/m06_comprehensive_evaluation",
        db_path: Optional[str] = "output/centralized.db",
        save_embeddings: bool = True,
        attn_implementation: str = "auto",
        cache_dir: Optional[str] = None,
        behaviour: bool = True,
        behaviour_prompts_per_class: int = 50,
        max_new_tokens: int = 64,
        geval: bool = True,
        refusal_judge: Literal["rules", "openai", "hf"] = "rules",
        refusal_judge_options: Optional[dict] = None,
    ):
        super().__init__()
        adapters = dict(adapters or {})
        if BASELINE in adapters:
            raise ValueError(f"adapter name {BASELINE!r} is reserved for the base model; rename that adapter")
        if n_bootstrap < 0:
            raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 0")
        self.save_hyperparameters()
        self.adapters = adapters
        self.variants = [BASELINE, *adapters]
        self.collectors = torch.nn.ModuleDict({v: RepresentationCollector() for v in self.variants})
        self.behaviour_collector = BehaviourCollector()
        self.responses: list[dict] = []  # this rank's generated responses (rank zero gathers them)
        self._behaviour_indices: set[int] = set()
        self._backend = None
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
        if not hp.behaviour:
            return
        from fteval.backends.hf import HFBackend

        records = self.trainer.datamodule.eval_records
        for label in (0, 1):
            chosen = [r["index"] for r in records if r["label"] == label][: hp.behaviour_prompts_per_class]
            self._behaviour_indices.update(chosen)
        dm = self.trainer.datamodule.hparams
        self._backend = HFBackend(self.model, self.tokenizer, batch_size=self.trainer.datamodule.hparams.eval_batch_size,
                                  max_new_tokens=hp.max_new_tokens, template=dm.template, system_prompt=dm.system_prompt)
        if hp.geval:
            from fteval.eval.geval import GEvalJudge

            self._judge = GEvalJudge(self.model, self.tokenizer, adapters_off=True)
        from fteval.eval.refusal import make_judge

        options = dict(hp.refusal_judge_options or {})
        if hp.refusal_judge == "hf" and "model" not in options and "model_name_or_path" not in options:
            options.update(model=self.model, tokenizer=self.tokenizer, adapters_off=True)
        self._refusal_judge = make_judge(hp.refusal_judge, **options)

    def _behaviour_step(self, batch: dict) -> None:
        records = self.trainer.datamodule.eval_records
        idx = [int(i) for i in batch["index"] if int(i) in self._behaviour_indices]
        if not idx:
            return
        prompts = [records[i]["prompt"] for i in idx]
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
                torch.tensor([REFUSAL_CODES.index(r.label) for r in refusals], device=self.device),
                geval.to(self.device), torch.tensor([r.completion_tokens for r in results], device=self.device))
            self.responses += [{"model": name, "prompt_id": str(i), "prompt": records[i]["prompt"], "response": t,
                                "safety_label": "unsafe" if records[i]["label"] else "safe", "axiom": records[i]["axiom"],
                                "refusal_label": r.label, "refusal_judge": self._refusal_judge.name, "backend": "hf",
                                "latency_s": g.latency_s,
                                "n_tokens": g.completion_tokens}
                               for i, t, r, g in zip(idx, texts, refusals, results)]

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.hparams.behaviour:
            self._behaviour_step(batch)
        for name in self.variants:
            with torch.no_grad(), self.variant(name) as model:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            reps = pool_layers(out.hidden_states, batch["attention_mask"], sink=self.hparams.sink)  # [B, L+1, D]
            if not torch.isfinite(reps).all():
                raise ValueError(
                    f"variant {name!r} produced NaN/inf hidden states in batch {batch_idx}; check the adapter "
                    "and the precision (fp16 overflow); evaluate in bf16 or fp32"
                )
            self.collectors[name].update(reps, batch["safety_label"], batch["index"])

    def on_test_epoch_end(self) -> None:
        data = {name: self.collectors[name].compute() for name in self.variants}
        self.results = self.summarise(data)
        if self.hparams.behaviour:
            self.summarise_behaviour(self.behaviour_collector.compute(), data[BASELINE])
            self.behaviour_collector.reset()
            self._gather_responses()
        for name in self.variants:
            for m in SUMMARY_METRICS:
                self.log(f"test/{name}/{m}", self.results["models"][name]["scores"][m], sync_dist=False)
        for name in self.adapters:
            self.log(f"test/{name}/delta_aqi", self.results["deltas"][name]["aqi"]["delta"], sync_dist=False)
        for c in self.collectors.values():
            c.reset()
        if self.trainer.is_global_zero:
            self.write_outputs(data)
            self.record_in_database()
            print(format_summary(self.results))

    # --------------------------------------------------------------- analysis
    def _pooled(self, reps: Tensor) -> Tensor:
        layers = self.hparams.layers
        if layers:
            reps = reps[:, list(layers)]
        return pool_over_layers(reps, self.hparams.layer_pooling)

    def summarise(self, data: dict[str, tuple[Tensor, Tensor, Tensor]]) -> dict:
        """Scores per model with intervals, and every pair of models compared (:mod:`fteval.eval.headtohead`)."""
        hp = self.hparams
        labels = data[BASELINE][1].cpu()
        for name, (_, lab, _) in data.items():
            if not torch.equal(lab.cpu(), labels):
                raise RuntimeError(f"variant {name!r} saw different prompts than the baseline")
        pooled = {name: self._pooled(reps.cpu()) for name, (reps, _, _) in data.items()}
        models: dict = {}
        silhouettes: dict = {}
        with_stats = bool(hp.n_bootstrap)
        for name, emb in pooled.items():
            scores = {k: float(v) for k, v in cluster_scores(emb, labels, lam=hp.lam).items()}
            entry = {"scores": scores, "n_prompts": int(labels.numel()),
                     "n_safe": int((labels == 0).sum()), "n_unsafe": int((labels == 1).sum())}
            if with_stats:
                sep = separation_intervals(emb, labels, confidence=hp.confidence, lam=hp.lam)
                entry["ci"] = {m: sep["ci"][m] for m in SUMMARY_METRICS}
                entry["bias_corrected"] = sep["estimate"]
                entry["separation"] = {k: sep[k] for k in ("ratio", "ratio_se", "noise_floor", "raw_ratio",
                                                           "excess_kurtosis", "heavy_tailed")}
            profile = layer_profile(data[name][0].cpu(), labels, lam=hp.lam)
            entry["layer_profile"] = {k: [float(x) for x in v] for k, v in profile.items() if k in ("aqi_bounded", "chi", "xbi")}
            if hp.layer_pooling == "attention":
                weights, _ = layer_attention_weights(data[name][0].cpu()[:, list(hp.layers)] if hp.layers else data[name][0].cpu())
                entry["layer_weights_mean"] = [float(w) for w in weights.mean(dim=0)]
            silhouettes[name] = per_prompt_separation(emb, labels)
            entry["mean_silhouette"] = float(silhouettes[name].mean())
            models[name] = entry
        comparisons: dict = {}
        for a, b in pairs(self.variants):
            if with_stats:
                comp = embedding_comparison(pooled[a], pooled[b], labels, models[a]["scores"], models[b]["scores"],
                                            silhouettes[a], silhouettes[b], hp.confidence, hp.lam)
            else:
                comp = {m: {"delta": models[a]["scores"][m] - models[b]["scores"][m], "ci": None, "p_value": None}
                        for m in SUMMARY_METRICS}
            comparisons[pair_key(a, b)] = {"a": a, "b": b, **comp}
        sizes = correct_families(comparisons, hp.correction, hp.confidence)
        return {
            "base_model": hp.model_name_or_path,
            "adapters": self.adapters,
            "settings": {"sink": hp.sink, "layer_pooling": hp.layer_pooling, "layers": hp.layers, "lam": hp.lam,
                         "intervals": INTERVAL_METHOD if with_stats else None, "confidence": hp.confidence,
                         "correction": hp.correction, "family_size": sizes},
            "models": models,
            "comparisons": comparisons,
            # adapter -> its comparison with the baseline (the same dicts as in "comparisons")
            "deltas": {name: comparisons[pair_key(name, BASELINE)] for name in self.adapters},
        }

    def _gather_responses(self) -> None:
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

    def summarise_behaviour(self, beh: dict, base: tuple[Tensor, Tensor, Tensor]) -> None:
        """Refusal/over-refusal rates (exact CIs) and G-Eval means per model; every pair compared per prompt.

        Per pair (:func:`fteval.eval.headtohead.behaviour_comparison`): exact McNemar tests of the
        refusal and over-refusal labels, paired G-Eval t-tests; then both p-value families of the
        run are adjusted (:func:`fteval.eval.headtohead.correct_families`).
        """
        from fteval.eval.refusal import refusal_rates

        if not beh:
            return
        labels_by_index = dict(zip(base[2].tolist(), base[1].tolist()))
        criteria = list(self._judge.criteria) if self._judge is not None else []
        per_variant: dict = {}
        for v, name in enumerate(self.variants):
            sel = beh["variant"].cpu() == v
            idx = beh["index"].cpu()[sel].tolist()
            codes = beh["refusal"].cpu()[sel].tolist()
            safety = ["unsafe" if labels_by_index[i] else "safe" for i in idx]
            rates = refusal_rates([REFUSAL_CODES[c] for c in codes], safety)
            entry = self.results["models"][name]
            entry["behaviour"] = {"rates": rates, "n_prompts": len(idx),
                                  "mean_completion_tokens": float(beh["tokens"].cpu()[sel].double().mean())}
            if "refusal_rate" in rates:
                entry["refusal_rate"] = rates["refusal_rate"]["value"]
            if "over_refusal_rate" in rates:
                entry["over_refusal_rate"] = rates["over_refusal_rate"]["value"]
            g = beh["geval"].cpu()[sel]
            entry["behaviour"]["geval"] = {c: float(g[:, k].mean()) for k, c in enumerate(criteria)}
            per_variant[name] = (idx, codes, g)
        for a, b in pairs(self.variants):
            (idx_a, codes_a, g_a), (idx_b, codes_b, g_b) = per_variant[a], per_variant[b]
            if idx_a != idx_b:
                raise RuntimeError(f"behaviour: variants {a!r} and {b!r} answered different prompts")
            safety = ["unsafe" if labels_by_index[i] else "safe" for i in idx_a]
            self.results["comparisons"][pair_key(a, b)]["behaviour"] = behaviour_comparison(
                codes_a, codes_b, safety, g_a.numpy(), g_b.numpy(), criteria, REFUSAL_CODES.index("full_refusal"),
                self.hparams.confidence)
        self.results["settings"]["family_size"] = correct_families(
            self.results["comparisons"], self.hparams.correction, self.hparams.confidence)

    def write_outputs(self, data: dict) -> None:
        from safetensors.torch import save_file

        out = Path(self.hparams.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.hparams.save_embeddings:
            tensors = {"labels": data[BASELINE][1].cpu(), "index": data[BASELINE][2].cpu()}
            for name, (reps, _, _) in data.items():
                tensors[f"{name}.pooled"] = self._pooled(reps.cpu()).contiguous()
                tensors[f"{name}.layers"] = reps.cpu().contiguous()  # [N, L+1, D]
            path = out / "embeddings.safetensors"
            tmp = out / ".embeddings.safetensors.tmp"
            save_file(tensors, str(tmp))
            tmp.replace(path)
            self.results["embeddings_path"] = str(path)
        if self.responses:
            tmp = out / ".responses.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.responses))
            tmp.replace(out / "responses.jsonl")
            self.results["responses_path"] = str(out / "responses.jsonl")
        write_json_atomic(out / "aqi_results.json", self.results)


    def record_in_database(self) -> None:
        """Scores, deltas, tests and the embeddings file as one transaction in the experiment database
        (the run logger's, where the experiment is; ``db_path`` only without that logger)."""
        db_path = self.experiment_db_path or self.hparams.db_path
        if self.experiment_id is None or not db_path:
            return
        from fteval.db import ExperimentDB

        res, hp = self.results, self.hparams
        rows = []
        for name, entry in res["models"].items():
            n = entry["n_prompts"]
            for metric, value in entry["scores"].items():
                ci = entry.get("ci", {}).get(metric) or [None, None]
                rows.append({"model": name, "metric": metric, "value": value, "pooling": hp.layer_pooling,
                             "ci_low": ci[0], "ci_high": ci[1], "n_samples": n})
            for metric, values in entry["layer_profile"].items():
                rows += [{"model": name, "metric": metric, "value": v, "layer": layer, "pooling": "token_mean",
                          "n_samples": n} for layer, v in enumerate(values)]
        for name, entry in res["models"].items():
            ci = entry.get("ci", {})
            for metric, value in entry.get("bias_corrected", {}).items():
                low, high = ci.get(metric) or [None, None]
                rows.append({"model": name, "metric": f"{metric}_bc", "value": value, "pooling": hp.layer_pooling,
                             "ci_low": low, "ci_high": high, "n_samples": entry["n_prompts"]})
        db = ExperimentDB(db_path)
        with db.transaction():
            for name, d in res["deltas"].items():
                for metric in SUMMARY_METRICS:
                    ci = d[metric]["ci"] or [None, None]
                    rows.append({"model": name, "metric": f"delta_{metric}", "value": d[metric]["delta"],
                                 "pooling": hp.layer_pooling, "ci_low": ci[0], "ci_high": ci[1],
                                 "p_value": d[metric]["p_value"]})
            store_tests(db, self.experiment_id, res["comparisons"], hp.correction, res["models"][BASELINE]["n_prompts"])
            db.add_aqi_scores(self.experiment_id, rows)
            beh_rows = []
            for name, entry in res["models"].items():
                beh = entry.get("behaviour")
                if not beh:
                    continue
                for metric, r in beh["rates"].items():
                    beh_rows.append({"model": name, "metric": metric, "value": r["value"], "category": r.get("category"),
                                     "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"), "n_samples": r.get("n_samples")})
                for crit, value in beh["geval"].items():
                    beh_rows.append({"model": name, "metric": f"geval_{crit}", "value": value, "category": "all",
                                     "n_samples": beh["n_prompts"]})
            if beh_rows:
                db.add_behavioral_metrics(self.experiment_id, beh_rows)
            if self.responses:
                db.add_model_responses(self.experiment_id, self.responses)
            if "embeddings_path" in res:
                db.add_hidden_states(self.experiment_id, ",".join(self.variants), res["embeddings_path"],
                                     pooling=f"{hp.sink}-sink token mean; {hp.layer_pooling} over layers",
                                     n_prompts=res["models"][BASELINE]["n_prompts"])
