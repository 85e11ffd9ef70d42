"""Where the results of ``fteval test`` go: the results folder and the run's experiment database.

* :func:`write_results_files`: ``embeddings.safetensors``, ``responses.jsonl`` and
  ``aqi_results.json`` in the results folder, each written atomically (:mod:`fteval.io`).
* :func:`record_results`: scores, Deltas, tests, behaviour rows, responses, the speed of the
  behaviour generation (``inference_benchmarks``, under the backend that generated it) and the embeddings file in the
  run's experiment, as one transaction. The database is the run's: the one
  :class:`callbacks.run_logger.ExperimentDBLogger` created the experiment in (it hands the module
  ``experiment_db_path`` with ``experiment_id``); the evaluator has no database setting of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from torch import Tensor

from fteval.backends.base import BASELINE, GENERATION_UNITS
from fteval.eval.headtohead import SUMMARY_METRICS
from fteval.io import write_atomic, write_json_atomic, write_text_atomic

__all__ = ["record_results", "store_tests", "write_results_files"]


def _pooling_text(settings: dict) -> str:
    """How the stored embeddings were pooled, in words (results of earlier versions have no 'tokens')."""
    if settings.get("tokens") == "post_instruction":
        tokens = "post-instruction token mean"
    else:
        tokens = f"{settings['sink']}-sink token mean"
    return f"{tokens}; {settings['layer_pooling']} over layers"


def write_results_files(results_dir: Union[str, Path], results: dict, embeddings: Optional[dict[str, Tensor]] = None,
                        responses: Optional[list[dict]] = None) -> Path:
    """Write the embeddings (when given), the responses (when any) and ``aqi_results.json``; return its path.

    The paths of the first two are added to ``results`` (``embeddings_path``, ``responses_path``)
    before ``aqi_results.json`` is written, so the JSON points to them.
    """
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    if embeddings is not None:
        from safetensors.torch import save_file

        path = write_atomic(out / "embeddings.safetensors", lambda tmp: save_file(embeddings, str(tmp)))
        results["embeddings_path"] = str(path)
    if responses:
        path = write_text_atomic(out / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in responses))
        results["responses_path"] = str(path)
    return write_json_atomic(out / "aqi_results.json", results)


def _score_rows(results: dict) -> list[dict]:
    """``aqi_scores`` rows: pooled scores with CIs, layer profiles, bias-corrected scores, Deltas vs the baseline."""
    pooling = results["settings"]["layer_pooling"]
    token_pooling = "post_instruction_mean" if results["settings"].get("tokens") == "post_instruction" else "token_mean"
    rows = []
    for name, entry in results["models"].items():
        n = entry["n_prompts"]
        for metric, value in entry["scores"].items():
            ci = entry.get("ci", {}).get(metric) or [None, None]
            rows.append({"model": name, "metric": metric, "value": value, "pooling": pooling,
                         "ci_low": ci[0], "ci_high": ci[1], "n_samples": n})
        for metric, values in entry["layer_profile"].items():
            rows += [{"model": name, "metric": metric, "value": v, "layer": layer, "pooling": token_pooling,
                      "n_samples": n} for layer, v in enumerate(values) if v is not None]
    for name, entry in results["models"].items():
        ci = entry.get("ci", {})
        for metric, value in entry.get("bias_corrected", {}).items():
            low, high = ci.get(metric) or [None, None]
            rows.append({"model": name, "metric": f"{metric}_bc", "value": value, "pooling": pooling,
                         "ci_low": low, "ci_high": high, "n_samples": entry["n_prompts"]})
    for name, d in results["deltas"].items():
        for metric in SUMMARY_METRICS:
            if d[metric]["delta"] is None:  # XBI with a separation at or below the noise floor
                continue
            ci = d[metric]["ci"] or [None, None]  # delta_*: the bias-corrected Delta, the centre of its interval
            rows.append({"model": name, "metric": f"delta_{metric}", "value": d[metric]["delta"],
                         "pooling": pooling, "ci_low": ci[0], "ci_high": ci[1], "p_value": d[metric]["p_value"]})
    return rows


def _behaviour_rows(results: dict) -> list[dict]:
    """``behavioral_metrics`` rows: refusal rates with their intervals and G-Eval means, per model."""
    rows = []
    for name, entry in results["models"].items():
        beh = entry.get("behaviour")
        if not beh:
            continue
        for metric, r in beh["rates"].items():
            rows.append({"model": name, "metric": metric, "value": r["value"], "category": r.get("category"),
                         "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"), "n_samples": r.get("n_samples")})
        for crit, value in beh["geval"].items():
            rows.append({"model": name, "metric": f"geval_{crit}", "value": value, "category": "all",
                         "n_samples": beh["n_prompts"]})
    return rows


def store_tests(db, experiment_id: int, comparisons: dict, correction: str, n_prompts: int) -> None:
    """Every test of every pair as a ``statistical_tests`` row (inside the caller's transaction).

    ``test``: ``paired_jackknife`` (separation Deltas and the mean silhouette's; statistic = the
    bias-corrected Delta, the centre of the interval), ``paired_t`` (G-Eval; statistic = t), ``mcnemar_exact`` (refusal_rate,
    over_refusal_rate; statistic = rate_a - rate_b). ``group_a``/``group_b`` = the pair (Delta =
    a - b); ``details``: the family, the raw Delta or counts, and the pair's key.
    """
    for key, comp in comparisons.items():
        a, b = comp["a"], comp["b"]
        common = {"experiment_id": experiment_id, "group_a": a, "group_b": b, "correction": correction}
        for m in SUMMARY_METRICS:
            t = comp.get(m) or {}
            if t.get("p_value") is None:
                continue
            db.add_statistical_test("paired_jackknife", m, statistic=t["delta"], p_value=t["p_value"],
                                    p_adjusted=t.get("p_adjusted"), ci_low=t["ci"][0], ci_high=t["ci"][1], n=n_prompts,
                                    details={"pair": key, "family": t.get("family"), "se": t["se"],
                                             "delta_plugin": t.get("delta_plugin")}, **common)
        t = comp.get("silhouette")
        if t and t["p_value"] == t["p_value"]:
            db.add_statistical_test("paired_jackknife", "mean_silhouette", statistic=t["mean_diff"], p_value=t["p_value"],
                                    p_adjusted=t.get("p_adjusted"), effect_size=t["cohens_d"],
                                    effect_size_name="cohens_d_z", ci_low=t["ci"][0], ci_high=t["ci"][1], n=n_prompts,
                                    details={"pair": key, "family": t.get("family"), "se": t["se"], "t": t["t"]},
                                    **common)
        for name, t in comp.get("behaviour", {}).items():
            if t.get("p_value") is None or t["p_value"] != t["p_value"]:
                continue
            if name in ("refusal", "over_refusal"):
                ci = t.get("ci") or [None, None]  # Newcombe's paired interval of the rate change
                db.add_statistical_test("mcnemar_exact", f"{name}_rate", statistic=t["delta"], p_value=t["p_value"],
                                        p_adjusted=t.get("p_adjusted"), n=t["n"], ci_low=ci[0], ci_high=ci[1],
                                        details={"pair": key, "family": t.get("family"), "rate_a": t["rate_a"],
                                                 "rate_b": t["rate_b"], "n_a_only": t["n_a_only"],
                                                 "n_b_only": t["n_b_only"], "mde": t["mde"]}, **common)
            else:
                db.add_statistical_test("paired_t", name, statistic=t["t"], p_value=t["p_value"],
                                        p_adjusted=t.get("p_adjusted"), effect_size=t["cohens_d"],
                                        effect_size_name="cohens_d_z", ci_low=t["ci"][0], ci_high=t["ci"][1],
                                        details={"pair": key, "family": t.get("family"), "mean_diff": t["mean_diff"]},
                                        **common)


def record_results(db_path: Union[str, Path], experiment_id: int, results: dict,
                   responses: Optional[list[dict]] = None) -> None:
    """Record one ``fteval test`` run in experiment ``experiment_id`` of the database at ``db_path``, in one transaction.

    ``results``: :func:`fteval.eval.results.summarise` (with behaviour and file paths, when there are
    any); ``responses``: the generated answers (``model_responses`` rows).
    """
    from fteval.db import ExperimentDB

    settings = results["settings"]
    n_prompts = results["models"][BASELINE]["n_prompts"]
    rows = _score_rows(results)
    behaviour = _behaviour_rows(results)
    with ExperimentDB(db_path) as db, db.transaction():
        store_tests(db, experiment_id, results["comparisons"], settings["correction"], n_prompts)
        db.add_aqi_scores(experiment_id, rows)
        if behaviour:
            db.add_behavioral_metrics(experiment_id, behaviour)
        if responses:
            db.add_model_responses(experiment_id, responses)
        for name, entry in (results.get("inference") or {}).items():
            db.add_inference_benchmark(entry["details"].get("backend", "hf"), name, entry["metrics"], experiment_id=experiment_id,
                                       units={k: u for k, u in GENERATION_UNITS.items() if k in entry["metrics"]},
                                       details=entry["details"])
        if "embeddings_path" in results:
            db.add_hidden_states(experiment_id, ",".join(results["models"]), results["embeddings_path"],
                                 pooling=_pooling_text(settings),
                                 n_prompts=n_prompts)
