"""What the stages record besides experiments and training curves: the typed insert helpers of :class:`ExperimentDB`.

Artifacts and datasets, evaluation rows (AQI scores, behaviour, responses, comparisons),
statistical tests, inference benchmarks, costs, recommendations and environment manifests.
Each helper validates its input and writes in one transaction; an ``experiment_id`` must name an
existing experiment (optional where the row may stand alone). :class:`RecordWriters` is a part of
:class:`fteval.db.store.ExperimentDB` (connection, transactions, experiments, queries), kept
apart so that each file holds one side of the data layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from fteval.db.connection import utc_now
from fteval.db.values import as_float, path_digest, to_json

__all__ = ["RecordWriters"]

# Columns accepted by the row-list insert helpers: (required, optional); ``details`` goes
# to ``details_json``.
_ROW_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "aqi_scores": (("model", "metric", "value"), ("layer", "pooling", "ci_low", "ci_high", "p_value", "n_samples")),
    "behavioral_metrics": (("model", "metric", "value"), ("category", "ci_low", "ci_high", "n_samples")),
    "model_responses": (
        ("model", "prompt", "response"),
        ("prompt_id", "source_row", "safety_label", "axiom", "refusal_label", "refusal_judge", "backend", "latency_s",
         "n_tokens"),
    ),
    "comparative_analysis": (("subject", "metric", "value"), ("details",)),
}
_REAL_COLUMNS = frozenset({"value", "ci_low", "ci_high", "p_value", "latency_s"})


class RecordWriters:
    """The insert helpers of :class:`fteval.db.ExperimentDB` for everything but experiments and training metrics.

    Uses the store's ``conn``, ``transaction()``, ``_insert()``, ``_require_experiment()`` and ``rows()``.
    """

    # -- artifacts and data ---------------------------------------------------------------
    def add_artifact(self, experiment_id: int, kind: str, path: Union[str, Path]) -> int:
        """Record a file or folder (adapter, checkpoint, ...) with its size and sha256; returns the row id."""
        size, digest, is_dir = path_digest(path)
        return self._insert("model_artifacts", {
            "experiment_id": experiment_id, "kind": kind, "path": str(Path(path).resolve()), "size_bytes": size,
            "sha256": digest, "is_dir": int(is_dir), "created_at": utc_now()}, experiment="required")

    def artifacts(self, experiment_id: int) -> list[dict[str, Any]]:
        """Artifact rows of an experiment."""
        return self.rows("model_artifacts", experiment_id=experiment_id)

    def add_hidden_states(
        self,
        experiment_id: int,
        model: str,
        path: Union[str, Path],
        *,
        layer: Optional[int] = None,
        pooling: Optional[str] = None,
        shape: Optional[Sequence[int]] = None,
        dtype: Optional[str] = None,
        n_prompts: Optional[int] = None,
    ) -> int:
        """Record an embeddings file (safetensors/npz; the array stays on disk) with size and sha256.

        Args:
            shape: the array shape, e.g. ``[prompts, layers + 1, hidden]``.
        """
        size, digest, _ = path_digest(path)
        return self._insert("hidden_states", {
            "experiment_id": experiment_id, "model": model, "layer": layer, "pooling": pooling,
            "path": str(Path(path).resolve()), "shape_json": to_json(None if shape is None else [int(s) for s in shape]),
            "dtype": dtype, "n_prompts": n_prompts, "size_bytes": size, "sha256": digest, "created_at": utc_now(),
        }, experiment="required")

    def add_dataset(
        self,
        name: str,
        *,
        split: Optional[str] = None,
        n_rows: Optional[int] = None,
        source: Optional[str] = None,
        sha256: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        experiment_id: Optional[int] = None,
    ) -> int:
        """Record a dataset version/split (hub id or file as ``source``); returns the row id."""
        return self._insert("datasets", {
            "experiment_id": experiment_id, "name": name, "split": split, "n_rows": n_rows, "source": source,
            "sha256": sha256, "metadata_json": to_json(metadata), "created_at": utc_now()}, experiment="optional")

    # -- evaluation rows ------------------------------------------------------------------
    def _insert_rows(self, table: str, experiment_id: Optional[int], rows: Iterable[Mapping[str, Any]],
                     fixed: Optional[Mapping[str, Any]] = None, optional_experiment: bool = False) -> int:
        """Insert validated row dicts (keys from ``_ROW_SPECS``) plus ``fixed`` columns in one transaction."""
        required, optional = _ROW_SPECS[table]
        allowed = set(required) | set(optional)
        now, data, columns = utc_now(), [], None
        for row in rows:
            unknown = set(row) - allowed
            missing = [c for c in required if c not in row]
            if unknown or missing:
                raise ValueError(
                    f"{table} row {dict(row)!r}: unknown keys {sorted(unknown)}, missing {missing}; "
                    f"allowed keys are {sorted(allowed)}."
                )
            values = {**(fixed or {}), **{c: row.get(c) for c in (*required, *optional)}}
            for c in _REAL_COLUMNS & values.keys():
                values[c] = as_float(values[c], f"{table}.{c}")
            if "details" in values:
                values["details_json"] = to_json(values.pop("details"))
            columns = list(values)
            data.append((experiment_id, *values.values(), now))
        if not data:
            return 0
        sql = (f"INSERT INTO {table} (experiment_id, {', '.join(columns)}, created_at)"
               f" VALUES ({', '.join('?' * (len(columns) + 2))})")
        with self.transaction():
            self._require_experiment(experiment_id, optional=optional_experiment)
            self.conn.executemany(sql, data)
        return len(data)

    def add_aqi_scores(self, experiment_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """AQI-family scores, one row per value: keys ``model, metric, value`` and optionally
        ``layer`` (None = pooled), ``pooling, ci_low, ci_high, p_value, n_samples``. Returns the count."""
        return self._insert_rows("aqi_scores", experiment_id, rows)

    def add_behavioral_metrics(self, experiment_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Refusal/G-Eval metrics: keys ``model, metric, value`` and optionally ``category, ci_low,
        ci_high, n_samples``. Returns the count."""
        return self._insert_rows("behavioral_metrics", experiment_id, rows)

    def add_model_responses(self, experiment_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Generated completions: keys ``model, prompt, response`` and optionally ``prompt_id,
        source_row, safety_label, axiom, refusal_label, refusal_judge, backend, latency_s, n_tokens``. Returns the count."""
        return self._insert_rows("model_responses", experiment_id, rows)

    def add_comparative_analysis(
        self, analysis: str, rows: Iterable[Mapping[str, Any]], *, experiment_id: Optional[int] = None
    ) -> int:
        """Cells of a comparison named ``analysis``: keys ``subject, metric, value`` and optionally
        ``details`` (JSON). Returns the count."""
        return self._insert_rows("comparative_analysis", experiment_id, rows, fixed={"analysis": analysis},
                                 optional_experiment=True)

    def add_inference_benchmark(
        self,
        backend: str,
        model: str,
        metrics: Mapping[str, Any],
        *,
        experiment_id: Optional[int] = None,
        units: Optional[Mapping[str, str]] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> int:
        """One benchmark of ``model`` on ``backend``: ``metrics`` name -> value (e.g.
        ``tokens_per_s``, ``latency_p50_s``), ``units`` name -> unit. Returns the row count."""
        if not metrics:
            raise ValueError(f"add_inference_benchmark({backend!r}, {model!r}) got no metrics.")
        now, units = utc_now(), dict(units or {})
        data = [(experiment_id, backend, model, name, as_float(v, f"benchmark {name!r}"), units.get(name),
                 to_json(details), now) for name, v in metrics.items()]
        with self.transaction():
            self._require_experiment(experiment_id, optional=True)
            self.conn.executemany(
                "INSERT INTO inference_benchmarks (experiment_id, backend, model, metric, value, unit, details_json,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", data)
        return len(data)

    def add_statistical_test(
        self,
        test: str,
        metric: str,
        *,
        statistic: Optional[float] = None,
        p_value: Optional[float] = None,
        experiment_id: Optional[int] = None,
        group_a: Optional[str] = None,
        group_b: Optional[str] = None,
        p_adjusted: Optional[float] = None,
        correction: Optional[str] = None,
        effect_size: Optional[float] = None,
        effect_size_name: Optional[str] = None,
        ci_low: Optional[float] = None,
        ci_high: Optional[float] = None,
        n: Optional[int] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> int:
        """One significance test (``paired_t``, ``bootstrap``, ...) of ``metric`` between ``group_a``
        and ``group_b``; p-values must lie in [0, 1]. Returns the row id."""
        for label, p in (("p_value", p_value), ("p_adjusted", p_adjusted)):
            if p is not None and not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {p!r} for test {test!r} on {metric!r}.")
        return self._insert("statistical_tests", {
            "experiment_id": experiment_id, "test": test, "metric": metric, "group_a": group_a, "group_b": group_b,
            "statistic": as_float(statistic, "statistic"), "p_value": as_float(p_value, "p_value"),
            "p_adjusted": as_float(p_adjusted, "p_adjusted"), "correction": correction,
            "effect_size": as_float(effect_size, "effect_size"), "effect_size_name": effect_size_name,
            "ci_low": as_float(ci_low, "ci_low"), "ci_high": as_float(ci_high, "ci_high"), "n": n,
            "details_json": to_json(details), "created_at": utc_now(),
        }, experiment="optional")

    def add_cost_analysis(
        self,
        item: str,
        *,
        gpu_hours: Optional[float] = None,
        price_per_hour: Optional[float] = None,
        cost: Optional[float] = None,
        currency: str = "USD",
        details: Optional[Mapping[str, Any]] = None,
        experiment_id: Optional[int] = None,
    ) -> int:
        """A cost line; ``cost`` defaults to ``gpu_hours * price_per_hour``. Returns the row id."""
        if cost is None and gpu_hours is not None and price_per_hour is not None:
            cost = float(gpu_hours) * float(price_per_hour)
        return self._insert("cost_analysis", {
            "experiment_id": experiment_id, "item": item, "gpu_hours": as_float(gpu_hours, "gpu_hours"),
            "price_per_hour": as_float(price_per_hour, "price_per_hour"), "cost": as_float(cost, "cost"),
            "currency": currency, "details_json": to_json(details), "created_at": utc_now(),
        }, experiment="optional")

    def add_recommendation(
        self, use_case: str, recommendation: str, *, confidence: Optional[float] = None,
        evidence: Optional[Any] = None,
    ) -> int:
        """A recommendation for a use case with a confidence in [0, 1] and its evidence (JSON)."""
        if confidence is not None and not 0.0 <= float(confidence) <= 1.0:
            raise ValueError(f"Recommendation confidence must lie in [0, 1], got {confidence!r}.")
        return self._insert("recommendations", {
            "use_case": use_case, "recommendation": recommendation, "confidence": as_float(confidence, "confidence"),
            "evidence_json": to_json(evidence), "created_at": utc_now()})

    def add_environment(self, manifest: Mapping[str, Any]) -> int:
        """Store an environment manifest from :func:`fteval.envinfo.collect_manifest`; returns the row id."""
        gpus = manifest.get("hardware", {}).get("gpus") or []
        return self._insert("environment", {
            "hostname": manifest.get("hostname"), "python": manifest.get("python"),
            "torch": manifest.get("packages", {}).get("torch"),
            "cuda_available": int(bool(manifest.get("hardware", {}).get("cuda_available"))),
            "gpu_names": ", ".join(g.get("name", "?") for g in gpus) or None,
            "hf_token_present": int(bool(manifest.get("hf_token_present"))), "manifest_json": to_json(manifest),
            "created_at": utc_now()})
