"""Schema of the centralized experiment database, as an ordered list of migrations.

Version 1 is the pipeline specification's table list (its "Database Schema" section), with the
same table names. Version 2 adds what the first users of the database needed:

* ``experiments.stage`` (``fit`` | ``test`` | ``env`` | ...): one Lightning module class can
  run both a fit and a test, and ``compare``/``report`` must tell them apart.
* ``environment``: one row per ``fteval env`` run (the m01 manifest), so the machine a
  result came from can be looked up next to the experiments.

Version 3 adds ``experiments.pid``, ``host`` and ``heartbeat_at``, so a run whose process died
without recording a status is marked ``crashed`` when the next run starts, and
``model_responses.refusal_judge`` (which judge labelled each response). Version 4 adds
``model_responses.source_row``: the row of the source data file a response's prompt came from.
Version 5 replaces the two per-method tables ``training_metrics_qlora`` / ``training_metrics_grit``
with one ``training_metrics`` table for every method (``method`` is the experiment's method, as
:mod:`fteval.methods` names it); the migration copies the old rows over, in their order, and
drops the old tables, so a database of an older fteval reads the same after it.

Where the measured quantities vary by method or by stage, rows are long and narrow,
``(experiment_id, step, name, value)`` or ``(experiment_id, model, metric, value)``, so a
new metric needs no migration. Timestamps are ISO-8601 UTC strings; JSON columns end in
``_json``; sizes are bytes, durations seconds.

A migration is a list of single SQL statements (no ``executescript``: it would commit on
its own) that :class:`fteval.db.ExperimentDB` runs inside one ``BEGIN IMMEDIATE``
transaction together with the ``schema_version`` row, so a database is always at exactly
one version.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Migration", "MIGRATIONS", "LATEST_VERSION", "TABLES", "METRICS_TABLE"]


@dataclass(frozen=True)
class Migration:
    """One schema step: ``statements`` take a database from ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]


# The schema_version table itself is created by every migration runner before anything
# else (``CREATE TABLE IF NOT EXISTS``), so it is not part of a migration.
SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL,"
    " applied_at TEXT NOT NULL)"
)


def _metric_table(name: str) -> tuple[str, ...]:
    # Version 1's per-method tables (long format: one row per experiment, optimizer step, metric name).
    return (
        f"CREATE TABLE {name} ("
        " id INTEGER PRIMARY KEY,"
        " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
        " step INTEGER NOT NULL,"
        " name TEXT NOT NULL,"
        " value REAL,"
        " created_at TEXT NOT NULL)",
        f"CREATE INDEX idx_{name}_exp_name_step ON {name}(experiment_id, name, step)",
    )


_V1 = (
    "CREATE TABLE experiments ("
    " id INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " method TEXT NOT NULL,"
    " status TEXT NOT NULL DEFAULT 'running',"  # running | finished | failed | interrupted | crashed
    " config_json TEXT,"
    " seed INTEGER,"
    " git_commit TEXT,"
    " packages_json TEXT,"
    " hardware_json TEXT,"
    " error TEXT,"
    " started_at TEXT NOT NULL,"
    " finished_at TEXT)",
    "CREATE INDEX idx_experiments_method ON experiments(method)",
    *_metric_table("training_metrics_qlora"),
    *_metric_table("training_metrics_grit"),
    "CREATE TABLE model_artifacts ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
    " kind TEXT NOT NULL,"  # adapter | checkpoint | merged_model | config | ...
    " path TEXT NOT NULL,"
    " size_bytes INTEGER NOT NULL,"
    " sha256 TEXT NOT NULL,"
    " is_dir INTEGER NOT NULL DEFAULT 0,"
    " created_at TEXT NOT NULL)",
    "CREATE INDEX idx_model_artifacts_exp ON model_artifacts(experiment_id)",
    "CREATE TABLE datasets ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER REFERENCES experiments(id) ON DELETE CASCADE,"
    " name TEXT NOT NULL,"
    " split TEXT,"
    " n_rows INTEGER,"
    " source TEXT,"
    " sha256 TEXT,"
    " metadata_json TEXT,"
    " created_at TEXT NOT NULL)",
    "CREATE TABLE aqi_scores ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
    " model TEXT NOT NULL,"  # baseline | qlora | grit | an adapter label
    " metric TEXT NOT NULL,"  # aqi | xbi | chi | delta_aqi | ...
    " value REAL,"
    " layer INTEGER,"  # NULL = layer-pooled representation
    " pooling TEXT,"
    " ci_low REAL,"
    " ci_high REAL,"
    " p_value REAL,"
    " n_samples INTEGER,"
    " created_at TEXT NOT NULL)",
    "CREATE INDEX idx_aqi_scores_exp ON aqi_scores(experiment_id, model, metric)",
    "CREATE TABLE hidden_states ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
    " model TEXT NOT NULL,"
    " layer INTEGER,"  # NULL = all layers in one array
    " pooling TEXT,"
    " path TEXT NOT NULL,"  # the array file (safetensors / npz), never the array itself
    " shape_json TEXT,"
    " dtype TEXT,"
    " n_prompts INTEGER,"
    " size_bytes INTEGER NOT NULL,"
    " sha256 TEXT NOT NULL,"
    " created_at TEXT NOT NULL)",
    "CREATE TABLE behavioral_metrics ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
    " model TEXT NOT NULL,"
    " metric TEXT NOT NULL,"  # refusal_rate | over_refusal_rate | geval_helpfulness | ...
    " value REAL,"
    " category TEXT,"  # safe | unsafe | all | an axiom
    " ci_low REAL,"
    " ci_high REAL,"
    " n_samples INTEGER,"
    " created_at TEXT NOT NULL)",
    "CREATE INDEX idx_behavioral_metrics_exp ON behavioral_metrics(experiment_id, model, metric)",
    "CREATE TABLE model_responses ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
    " model TEXT NOT NULL,"
    " prompt_id TEXT,"
    " prompt TEXT NOT NULL,"
    " response TEXT NOT NULL,"
    " safety_label TEXT,"
    " axiom TEXT,"
    " refusal_label TEXT,"
    " backend TEXT,"
    " latency_s REAL,"
    " n_tokens INTEGER,"
    " created_at TEXT NOT NULL)",
    "CREATE INDEX idx_model_responses_exp ON model_responses(experiment_id, model)",
    "CREATE TABLE inference_benchmarks ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER REFERENCES experiments(id) ON DELETE CASCADE,"
    " backend TEXT NOT NULL,"
    " model TEXT NOT NULL,"
    " metric TEXT NOT NULL,"  # tokens_per_s | latency_p50_s | peak_memory_gib | ...
    " value REAL,"
    " unit TEXT,"
    " details_json TEXT,"
    " created_at TEXT NOT NULL)",
    "CREATE TABLE statistical_tests ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER REFERENCES experiments(id) ON DELETE CASCADE,"
    " test TEXT NOT NULL,"  # paired_t | bootstrap | wilcoxon | ...
    " metric TEXT NOT NULL,"
    " group_a TEXT,"
    " group_b TEXT,"
    " statistic REAL,"
    " p_value REAL,"
    " p_adjusted REAL,"
    " correction TEXT,"  # holm | bh | none
    " effect_size REAL,"
    " effect_size_name TEXT,"  # cohens_d | ...
    " ci_low REAL,"
    " ci_high REAL,"
    " n INTEGER,"
    " details_json TEXT,"
    " created_at TEXT NOT NULL)",
    "CREATE TABLE comparative_analysis ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER REFERENCES experiments(id) ON DELETE CASCADE,"
    " analysis TEXT NOT NULL,"  # name of the comparison, e.g. "qlora_vs_grit"
    " subject TEXT NOT NULL,"  # the run / method / model the value belongs to
    " metric TEXT NOT NULL,"
    " value REAL,"
    " details_json TEXT,"
    " created_at TEXT NOT NULL)",
    "CREATE TABLE cost_analysis ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER REFERENCES experiments(id) ON DELETE CASCADE,"
    " item TEXT NOT NULL,"  # training | inference | ...
    " gpu_hours REAL,"
    " price_per_hour REAL,"
    " cost REAL,"
    " currency TEXT,"
    " details_json TEXT,"
    " created_at TEXT NOT NULL)",
    "CREATE TABLE recommendations ("
    " id INTEGER PRIMARY KEY,"
    " use_case TEXT NOT NULL,"
    " recommendation TEXT NOT NULL,"
    " confidence REAL,"  # in [0, 1]
    " evidence_json TEXT,"
    " created_at TEXT NOT NULL)",
)

_V2 = (
    "ALTER TABLE experiments ADD COLUMN stage TEXT NOT NULL DEFAULT 'fit'",
    "CREATE INDEX idx_experiments_stage ON experiments(stage)",
    "CREATE TABLE environment ("
    " id INTEGER PRIMARY KEY,"
    " hostname TEXT,"
    " python TEXT,"
    " torch TEXT,"
    " cuda_available INTEGER,"
    " gpu_names TEXT,"
    " hf_token_present INTEGER,"
    " manifest_json TEXT NOT NULL,"
    " created_at TEXT NOT NULL)",
)

# Who runs an experiment: a row left 'running' by a process that died (kill -9, power loss) is
# found on the next start by its pid (same host) or its silent heartbeat (other hosts).
_V3 = (
    "ALTER TABLE experiments ADD COLUMN pid INTEGER",
    "ALTER TABLE experiments ADD COLUMN host TEXT",
    "ALTER TABLE experiments ADD COLUMN heartbeat_at TEXT",
    "ALTER TABLE model_responses ADD COLUMN refusal_judge TEXT",  # which judge labelled the response
)

# Tracing a response to its prompt's row in the source data file (the evaluation set's ``source_row``).
_V4 = ("ALTER TABLE model_responses ADD COLUMN source_row INTEGER",)

# One per-step metrics table for every method; the old rows are copied in their order (the two old
# tables numbered rows independently, so the copies get new ids: the qlora table's, then the grit table's).
_V5 = (
    "CREATE TABLE training_metrics ("
    " id INTEGER PRIMARY KEY,"
    " experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,"
    " method TEXT NOT NULL,"  # the experiment's method (fteval.methods)
    " step INTEGER NOT NULL,"  # optimizer step
    " name TEXT NOT NULL,"
    " value REAL,"
    " created_at TEXT NOT NULL)",
    "CREATE INDEX idx_training_metrics_exp_name_step ON training_metrics(experiment_id, name, step)",
    "CREATE INDEX idx_training_metrics_method ON training_metrics(method, name)",
    *(f"INSERT INTO training_metrics (experiment_id, method, step, name, value, created_at)"
      f" SELECT t.experiment_id, COALESCE(e.method, '{old}'), t.step, t.name, t.value, t.created_at"
      f" FROM training_metrics_{old} t LEFT JOIN experiments e ON e.id = t.experiment_id ORDER BY t.id"
      for old in ("qlora", "grit")),
    "DROP TABLE training_metrics_qlora",
    "DROP TABLE training_metrics_grit",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: the spec's tables", _V1),
    Migration(2, "experiments.stage and the environment table", _V2),
    Migration(3, "experiments.pid, host and heartbeat_at; model_responses.refusal_judge", _V3),
    Migration(4, "model_responses.source_row", _V4),
    Migration(5, "one training_metrics table for every method (replaces training_metrics_qlora/_grit)", _V5),
)
LATEST_VERSION = MIGRATIONS[-1].version

# Every table of the latest schema, in creation order (export and queries use this list;
# table names cannot be SQL parameters, so only these are ever spliced into SQL).
TABLES: tuple[str, ...] = (
    "schema_version",
    "experiments",
    "training_metrics",
    "model_artifacts",
    "datasets",
    "aqi_scores",
    "hidden_states",
    "behavioral_metrics",
    "model_responses",
    "inference_benchmarks",
    "statistical_tests",
    "comparative_analysis",
    "cost_analysis",
    "recommendations",
    "environment",
)

# The long-format table of every method's per-step metrics.
METRICS_TABLE = "training_metrics"
