"""The report's generated sections: the adapter to ship, monitoring thresholds, scaling and cost, open questions."""

from __future__ import annotations

import json
import math

import pytest

from fteval.analysis.document import Bullets, Para, Table
from fteval.analysis.guidance import monitoring, open_questions, scaling, shipped_adapter
from fteval.analysis.report import report
from fteval.analysis.synthesis import gather
from fteval.db import ExperimentDB


def _with_tests(db_path, tests: dict[tuple[str, str], tuple[float, float, float]]):
    """Store bounded-AQI pair tests ``{(a, b): (Delta, p_adjusted, se)}`` under the evaluation and gather."""
    with ExperimentDB(db_path) as db:
        eid = next(e["id"] for e in db.rows("experiments") if e["method"] == "aqi_eval")
        with db.transaction():
            for (a, b), (delta, p_adj, se) in tests.items():
                db.add_statistical_test("paired_jackknife", "aqi_bounded", statistic=delta, p_value=p_adj / 3,
                                        p_adjusted=p_adj, correction="holm", group_a=a, group_b=b, n=40,
                                        ci_low=delta - 1.96 * se, ci_high=delta + 1.96 * se,
                                        details={"family": "aqi", "se": se}, experiment_id=eid)
        return gather(db, 2.5)


def test_an_adapter_that_erodes_alignment_is_not_shipped(run_db):
    s = _with_tests(run_db, {("qlora", "baseline"): (-0.002, 0.6, 0.004), ("grit", "baseline"): (-0.05, 0.01, 0.01),
                             ("grit", "qlora"): (-0.048, 0.02, 0.01)})
    best, why = shipped_adapter(s)
    assert best == "qlora" and "grit excluded" in why


def test_a_significant_head_to_head_decides(run_db):
    s = _with_tests(run_db, {("qlora", "baseline"): (-0.01, 0.3, 0.01), ("grit", "baseline"): (0.01, 0.3, 0.01),
                             ("grit", "qlora"): (0.02, 0.004, 0.005)})
    best, why = shipped_adapter(s)
    assert best == "grit" and "higher than qlora's by 0.0200" in why


def test_without_a_significant_difference_the_task_loss_decides(run_db):
    s = _with_tests(run_db, {("qlora", "baseline"): (-0.01, 0.3, 0.01), ("grit", "baseline"): (0.0, 0.9, 0.01),
                             ("grit", "qlora"): (0.01, 0.3, 0.01)})
    best, why = shipped_adapter(s)
    loss = {m: (r.final_val_loss if math.isfinite(r.final_val_loss) else r.final_train_loss_smoothed)
            for m, r in s.adapter_runs.items()}
    assert best == min(loss, key=loss.get) and "task loss decides" in why


def test_when_every_adapter_erodes_alignment_none_is_shipped(run_db):
    s = _with_tests(run_db, {("qlora", "baseline"): (-0.04, 0.01, 0.01), ("grit", "baseline"): (-0.05, 0.01, 0.01)})
    best, why = shipped_adapter(s)
    assert best is None and "ship the baseline" in why


def test_thresholds_and_questions_come_from_the_run(run_db):
    s = _with_tests(run_db, {("qlora", "baseline"): (-0.01, 0.3, 0.01), ("grit", "baseline"): (-0.02, 0.4, 0.02),
                             ("grit", "qlora"): (-0.01, 0.5, 0.008)})
    best, _ = shipped_adapter(s)
    assert best == "qlora"  # the lower task loss in the recorded run
    text = " ".join(" ".join(b.items) for b in monitoring(s) if isinstance(b, Bullets))
    row = s.evaluation.scores["qlora"].get("aqi_bounded_bc") or s.evaluation.scores["qlora"]["aqi_bounded"]
    assert f"less than **{row['ci_low']:.4g}**" in text
    assert "stop_if_delta_below: -0.0280" in text  # 2.8016 (z 0.975 + z 0.80) x the standard error 0.01
    questions = " ".join(" ".join(b.items) for b in open_questions(s) if isinstance(b, Bullets))
    per_class = s.evaluation.n_prompts // 2
    need = math.ceil(per_class * (2.801585 * 0.008 / 0.01) ** 2)
    assert f"about {need} prompts per class would detect 0.0100" in questions
    assert "One training run per method" in questions


def test_scaling_turns_fit_time_into_cost_per_1k_examples(run_db):
    with ExperimentDB(run_db) as db:  # the recorded runs predate the CLI section of the stored config: add it
        for e in db.rows("experiments"):
            if e["method"] in ("qlora", "grit"):
                config = {**e["config"], "cli": {"data": {"batch_size": 3}}}
                db.conn.execute("UPDATE experiments SET config_json = ? WHERE id = ?", (json.dumps(config), e["id"]))
        db.conn.commit()
    s = _with_tests(run_db, {("grit", "qlora"): (0.001, 0.8, 0.01)})
    blocks = scaling(s)
    table = next(b for b in blocks if isinstance(b, Table))
    assert [row[0] for row in table.rows] == [r.label for r in s.runs]
    for run, row in zip(s.runs, table.rows):
        eps = 3 * (s.run_configs[run.label]["trainer"].get("accumulate_grad_batches") or 1)
        hours = run.fit_seconds / 3600 / (run.n_steps * eps) * 1000
        assert float(row[3]) == pytest.approx(1e6 / run.tokens_per_s / 3600, rel=1e-3)
        assert row[4] == str(eps) and float(row[5]) == pytest.approx(hours, rel=1e-3)
        assert float(row[6]) == pytest.approx(hours * 2.5, rel=1e-3)
    roi = next(b.text for b in blocks if isinstance(b, Para) and b.text.startswith("GRIT costs"))
    assert "not significant" in roi


def test_report_has_the_generated_sections(run_db, tmp_path):
    assert report(run_db, tmp_path / "m07") == 0
    md = (tmp_path / "m07" / "report.md").read_text()
    for heading in ("## Deployment guidance", "## Monitoring and QA", "## Scaling and cost", "## Open questions",
                    "## Alignment over training"):
        assert heading in md
    assert "vllm serve" in md and "--lora-modules" in md and "llama-server" in md


def _three_adapters(tests: dict[tuple[str, str], tuple[float, float]], losses: dict[str, float]):
    """A synthesis with the baseline and qlora, qdora, lora adapters; ``tests``: ``{(a, b): (Delta, p_adjusted)}``."""
    from types import SimpleNamespace

    rows = [{"experiment_id": 7, "test": "paired_jackknife", "metric": "aqi_bounded", "group_a": a, "group_b": b,
             "statistic": d, "p_adjusted": p, "ci_low": d - 0.01, "ci_high": d + 0.01} for (a, b), (d, p) in tests.items()]
    runs = {m: SimpleNamespace(final_val_loss=v, final_train_loss_smoothed=v) for m, v in losses.items()}
    scores = {m: {} for m in ("baseline", *losses)}
    return SimpleNamespace(evaluation=SimpleNamespace(experiment={"id": 7}, scores=scores), tests=rows, adapter_runs=runs)


def test_with_more_than_two_adapters_the_one_that_beats_every_other_is_shipped():
    losses = {"qlora": 1.0, "qdora": 1.2, "lora": 0.9}
    base = {(m, "baseline"): (0.0, 0.9) for m in losses}
    s = _three_adapters({**base, ("qdora", "qlora"): (0.03, 0.01), ("qdora", "lora"): (0.05, 0.002),
                         ("lora", "qlora"): (0.0, 0.8)}, losses)
    best, why = shipped_adapter(s)
    assert best == "qdora" and "higher than qlora's by 0.0300" in why and "every other adapter" in why
    # beating one rival but not the other is not enough: the task loss decides among all three
    s = _three_adapters({**base, ("qdora", "qlora"): (0.03, 0.01), ("qdora", "lora"): (0.01, 0.3),
                         ("lora", "qlora"): (0.0, 0.8)}, losses)
    best, why = shipped_adapter(s)
    assert best == "lora" and "task loss decides" in why


def test_cost_return_reads_a_pair_tested_in_the_other_order():
    from fteval.analysis.guidance import _cost_return

    s = _three_adapters({("qlora", "qdora"): (-0.02, 0.01)}, {"qlora": 1.0, "qdora": 1.2})
    text = _cost_return(s, "qdora", "qlora", {"qlora": 2.0, "qdora": 3.0}, 2.5)
    # QDoRA's Delta over QLoRA is +0.02 (the stored test is QLoRA - QDoRA); +0.02 / (3 - 2) / 2.5 = +0.008
    assert text.startswith("QDoRA costs +50.0% per 1k training examples against QLoRA")
    assert "differs by +0.0200" in text and "+0.008 bounded AQI per unit" in text
    s = _three_adapters({("qlora", "qdora"): (-0.02, 0.4)}, {"qlora": 1.0, "qdora": 1.2})
    assert "(+0.0200, Holm-adjusted p 0.4) is not significant" in _cost_return(s, "qdora", "qlora",
                                                                             {"qlora": 2.0, "qdora": 3.0}, 2.5)
