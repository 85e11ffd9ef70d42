"""fteval report: report.md, the self-contained report.html (rendered in headless Chromium), DB rows, export."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest

from fteval.analysis.compare import compare
from fteval.analysis.document import Chart, Para, Table, to_html
from fteval.analysis.report import report
from fteval.analysis.synthesis import SOURCE, ParetoPoint, mark_frontier
from fteval.db import ExperimentDB


def _exp(recorded: dict, method: str) -> dict:
    return next(e for e in recorded["experiments"] if e["method"] == method)


def _last(recorded: dict, method: str, name: str) -> float:
    return [m for m in _exp(recorded, method)["metrics"] if m[1] == name][-1][2]


def _aqi(recorded: dict, model: str, metric: str) -> dict:
    return next(r for r in _exp(recorded, "aqi_eval")["aqi_scores"]
                if r["model"] == model and r["metric"] == metric and r["layer"] is None)


def _chart_specs(page: str) -> list[dict]:
    data = re.search(r'<script type="application/json" id="fteval-charts">(.*?)</script>', page, re.S).group(1)
    return json.loads(data)


@pytest.fixture()
def rendered(run_db, tmp_path):
    """compare, then report, on a private copy of the recorded database."""
    compare(run_db, tmp_path / "m04")
    out = tmp_path / "m07"
    assert report(run_db, out, gpu_price_per_hour=2.5) == 0
    return out, run_db


def test_report_markdown_numbers_rows_and_export(rendered, recorded):
    out, db_path = rendered
    md = (out / "report.md").read_text()
    assert f"final train loss {_last(recorded, 'qlora', 'train/loss'):.4g}" in md  # 4.779
    assert f"validation loss {_last(recorded, 'grit', 'val/loss'):.4g}" in md  # 4.027
    d_q = _aqi(recorded, "qlora", "delta_aqi")
    assert f"Delta-AQI qlora - baseline: {d_q['value']:.4g} [{d_q['ci_low']:.4g}, {d_q['ci_high']:.4g}]" in md
    base = _aqi(recorded, "baseline", "aqi_bounded")
    assert f"baseline {base['value']:.4g} [{base['ci_low']:.4g}, {base['ci_high']:.4g}]" in md
    assert "Refusal rate, over-refusal and G-Eval: not measured." in md
    assert "Not measured: no inference_benchmarks rows" in md
    assert "CPU hours" in md and "AQI rests on 40 prompts" in md
    assert "does not contain its own point estimate" in md  # the recorded bootstrap CIs exclude their estimates
    assert "GRIT grit#2: mean effective rank 8 of r=16; effective parameters 4,096 of 8,192 stored (50.0% fewer)." in md

    fit_s = _last(recorded, "grit", "time/fit_s")
    with ExperimentDB(db_path) as db:
        costs = {(c["item"], c["details"]["subject"]): c for c in db.rows("cost_analysis")}
        recs = db.rows("recommendations")
        n_aqi = len(db.rows("aqi_scores"))
    grit_cost = costs[("training", "grit#2")]
    assert grit_cost["gpu_hours"] == pytest.approx(fit_s / 3600)
    assert grit_cost["cost"] == pytest.approx(fit_s / 3600 * 2.5)
    assert grit_cost["details"]["hours_kind"] == "CPU" and grit_cost["details"]["source"] == SOURCE
    ev = _exp(recorded, "aqi_eval")
    assert costs[("evaluation", ev["name"])]["gpu_hours"] == pytest.approx(204.183 / 3600, rel=1e-3)  # 10:06:56.460 -> 10:10:20.643
    assert f"{grit_cost['cost']:.4g}" in md
    assert len(recs) == 9 and all(0.0 <= r["confidence"] <= 1.0 for r in recs)
    by_case = {r["use_case"]: r for r in recs}
    cheap = by_case["Lowest training cost (budget)"]
    assert cheap["recommendation"].startswith("qlora (qlora#1)") and cheap["evidence"]["source"] == SOURCE
    assert {"table": "statistical_tests", "id": 7} in cheap["evidence"]["items"][-1]["refs"]  # the step-time test of compare
    assert by_case["Answer quality (G-Eval)"]["confidence"] == 0.0
    assert by_case["Strongest safe/unsafe separation (alignment, AQI)"]["recommendation"].startswith("no adapter")

    with open(out / "data" / "aqi_scores.csv", newline="") as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == n_aqi == 311
    exported = json.loads((out / "data" / "recommendations.json").read_text())
    assert len(exported) == 9  # the export ran after this report's rows were written


def test_report_price_scales_and_rerun_replaces(rendered, recorded):
    out, db_path = rendered
    report(db_path, out, gpu_price_per_hour=5.0)
    with ExperimentDB(db_path) as db:
        costs = db.rows("cost_analysis")
        recs = db.rows("recommendations")
    assert len(costs) == 3 and len(recs) == 9  # two fits + one evaluation; replaced, not appended
    qlora = next(c for c in costs if c["details"]["subject"] == "qlora#1")
    assert qlora["cost"] == pytest.approx(_last(recorded, "qlora", "time/fit_s") / 3600 * 5.0)
    assert qlora["price_per_hour"] == 5.0
    with pytest.raises(ValueError, match="gpu_price_per_hour"):
        report(db_path, out, gpu_price_per_hour=-1.0)


def test_report_with_behaviour_and_benchmarks(run_db, tmp_path):
    with ExperimentDB(run_db) as db:
        eid = db.create_experiment("behaviour", "behaviour", stage="test")
        db.add_behavioral_metrics(eid, [
            {"model": "baseline", "metric": "refusal_rate", "value": 0.40, "category": "unsafe", "n_samples": 20},
            {"model": "baseline", "metric": "over_refusal_rate", "value": 0.05, "category": "safe", "n_samples": 20},
            {"model": "grit", "metric": "refusal_rate", "value": 0.70, "category": "unsafe", "n_samples": 20,
             "ci_low": 0.48, "ci_high": 0.85},
            {"model": "grit", "metric": "over_refusal_rate", "value": 0.10, "category": "safe", "n_samples": 20},
            {"model": "qlora", "metric": "refusal_rate", "value": 0.65, "category": "unsafe", "n_samples": 20},
            {"model": "qlora", "metric": "over_refusal_rate", "value": 0.25, "category": "safe", "n_samples": 20},
        ])
        db.add_inference_benchmark("hf", "grit", {"tokens_per_s": 90.0, "latency_p50_s": 0.8},
                                   units={"tokens_per_s": "tokens/s", "latency_p50_s": "s"}, experiment_id=eid)
        db.finish_experiment(eid)
    out = tmp_path / "m07"
    report(run_db, out, gpu_price_per_hour=3.6)
    md = (out / "report.md").read_text()
    assert "| grit | refusal_rate | unsafe | 0.7 [0.48, 0.85] | 20 |" in md
    assert "Answers generated through hf (grit): the evaluation's behaviour_backend" in md
    with ExperimentDB(run_db) as db:
        recs = {r["use_case"]: r for r in db.rows("recommendations")}
        inference = [c for c in db.rows("cost_analysis") if c["item"] == "inference_per_1m_tokens"]
    # refusal minus over-refusal: baseline 0.35, grit 0.60, qlora 0.40
    assert recs["Refuse unsafe requests without over-refusing safe ones"]["recommendation"] == \
        "grit: highest refusal rate minus over-refusal rate (0.6)"
    assert recs["Serving speed (inference)"]["recommendation"] == "grit on hf: 90 tokens/s"
    assert inference[0]["cost"] == pytest.approx(3.6 * 1e6 / 90.0 / 3600)  # 11.11 per million tokens
    assert "Refusal rate, over-refusal and G-Eval: not measured." not in md
    assert "- Not measured: G-Eval.\n" in md  # refusal and inference were measured; only G-Eval is missing
    # compare never ran on this copy: the training tests are computed for the report and said to be unstored
    assert "The training tests were computed for this report" in md
    assert "| training (compare) | mann_whitney_u | step_time_s | qlora#1 vs grit#2 |" in md


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report(tmp_path / "missing.db", tmp_path / "out")
    empty = tmp_path / "empty.db"
    ExperimentDB(empty).close()
    with pytest.raises(ValueError, match="no training run, evaluation or benchmark"):
        report(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pareto_frontier_rule():
    pts = mark_frontier([ParetoPoint("baseline", 0.0, 0.10, (None, None)), ParetoPoint("qlora", 1.0, 0.20, (None, None)),
                         ParetoPoint("grit", 3.0, 0.15, (None, None)), ParetoPoint("twin", 1.0, 0.20, (None, None))])
    # sorted by cost; equal points do not dominate each other; grit costs more than qlora and scores less
    assert [(p.name, p.on_frontier) for p in pts] == [("baseline", True), ("qlora", True), ("twin", True), ("grit", False)]


def test_html_is_self_contained_and_escaped(rendered):
    out, _ = rendered
    page = (out / "report.html").read_text()
    assert "<link" not in page and not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace, not a request
    ids = [c["id"] for c in _chart_specs(page)]
    assert ids == ["chart-loss", "chart-step-time-s", "chart-tokens-per-s", "chart-peak-memory-gib", "chart-effective-rank",
                   "chart-aqi", "chart-delta-aqi", "chart-layers", "chart-pareto"]
    assert all(f'id="{i}"' in page for i in ids)
    hostile = to_html("t", [Para("a <b> & **bold**"), Table(["h"], [["</td><script>x</script>"]]),
                            Chart({"id": "c1", "kind": "bars", "title": "</script><script>alert(1)</script>",
                                   "categories": [{"name": "</script>", "value": float("nan")}]})])
    assert "a &lt;b&gt; &amp; <strong>bold</strong>" in hostile
    assert "<script>x</script>" not in hostile and "<script>alert(1)" not in hostile
    assert _chart_specs(hostile)[0]["categories"][0] == {"name": "</script>", "value": None}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")


def test_report_html_renders_in_headless_chromium(rendered, tmp_path):
    browser = _chromium()
    out, _ = rendered
    page = out / "report.html"
    n_charts = len(_chart_specs(page.read_text()))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html_tag = re.search(r"<html[^>]*>", dom.stdout).group(0)
    assert f'data-charts-rendered="{n_charts}"' in html_tag and 'data-chart-errors="0"' in html_tag
    assert f"[{n_charts} charts]</title>" in dom.stdout
    assert dom.stdout.count('data-rendered="true"') == n_charts
    assert dom.stdout.count("<svg") >= n_charts and dom.stdout.count("<rect") > 10  # bars and plot areas drawn
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "console messages while rendering report.html:\n" + "\n".join(console)

    shot = tmp_path / "report_screenshot.png"
    run = subprocess.run(flags + ["--window-size=1280,6000", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    print(f"report.html screenshot: {shot}")


def test_headless_check_catches_a_broken_chart(tmp_path):
    """The render check can fail: a chart whose data breaks the script is counted and logged."""
    browser = _chromium()
    page = tmp_path / "broken.html"
    good = {"id": "ok", "kind": "bars", "title": "fine", "categories": [{"name": "a", "value": 1.0}]}
    broken = {"id": "bad", "kind": "line", "title": "no series points", "series": [{"name": "s"}]}
    page.write_text(to_html("broken", [Chart(good), Chart(broken)]))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                          "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    html_tag = re.search(r"<html[^>]*>", dom.stdout).group(0)
    assert 'data-charts-rendered="1"' in html_tag and 'data-chart-errors="1"' in html_tag
    assert any("CONSOLE" in line and "fteval chart: bad" in line for line in dom.stderr.splitlines())


_INTERACT = """<script>
window.addEventListener("load", function () {
  var box = document.getElementById("chart-loss"), svg = box.querySelector("svg"), r = svg.getBoundingClientRect();
  var full = box.chartApi.domain().x.slice();
  function at(type, fx, fy, target) {
    (target || svg).dispatchEvent(new MouseEvent(type, {clientX: r.left + fx * r.width, clientY: r.top + fy * r.height,
                                                        bubbles: true}));
  }
  at("mousedown", 0.30, 0.5); at("mousemove", 0.70, 0.5); at("mouseup", 0.70, 0.5, window);  // drag: zoom the x axis
  var zoomed = box.chartApi.domain().x.slice();
  at("mousemove", 0.5, 0.5);  // hover the middle
  var tip = box.querySelector(".tip");
  svg.dispatchEvent(new MouseEvent("dblclick", {bubbles: true}));
  document.documentElement.setAttribute("data-test", JSON.stringify(
    {full: full, zoomed: zoomed, reset: box.chartApi.domain().x, tip: tip.textContent, shown: tip.style.display}));
});
</script>"""


def test_loss_chart_zooms_and_shows_hover_values(rendered, tmp_path):
    """Drag-to-zoom narrows the x domain, hovering shows every series' value at that step, double-click resets."""
    browser = _chromium()
    out, _ = rendered
    page = tmp_path / "interact.html"
    page.write_text((out / "report.html").read_text().replace("</body>", _INTERACT + "</body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                          "--window-size=1280,900", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    state = json.loads(__import__("html").unescape(re.search(r'data-test="([^"]*)"', dom.stdout).group(1)))
    (lo, hi), (zlo, zhi) = state["full"], state["zoomed"]
    assert lo < 1 and hi > 6 and lo < zlo < zhi < hi and (zhi - zlo) < 0.6 * (hi - lo)
    assert state["reset"] == state["full"] and state["shown"] == "block"
    step = re.match(r"optimizer step (\d+)", state["tip"])
    assert step and zlo <= int(step.group(1)) <= zhi
    assert "qlora#1 train (smoothed): " in state["tip"] and "grit#2 train (smoothed): " in state["tip"]


def test_head_to_head_recommendation_from_stored_pair_tests(run_db, tmp_path):
    """The pair tests fteval test stores (here: of a summary of synthetic representations, written by the same
    store_tests) give a "Head to head: GRIT vs QLoRA" row citing them, and the Delta rows come from the jackknife."""
    from fteval.eval.outputs import store_tests
    from tests.eval.test_module import _synthetic_run

    res = _synthetic_run()
    with ExperimentDB(run_db) as db:
        eid = next(e["id"] for e in db.rows("experiments") if e["method"] == "aqi_eval")
        with db.transaction():
            store_tests(db, eid, res["comparisons"], "holm", 60)
        stored = {t["id"]: t for t in db.rows("statistical_tests") if t["group_b"] == "qlora"}
    assert {t["test"] for t in stored.values()} == {"paired_jackknife", "mcnemar_exact"}  # G-Eval constant: no t-test
    assert {t["metric"] for t in stored.values() if t["test"] == "paired_jackknife"} == {
        "aqi", "aqi_bounded", "xbi", "chi", "mean_silhouette"}
    assert report(run_db, tmp_path / "m07") == 0
    with ExperimentDB(run_db) as db:
        recs = {r["use_case"]: r for r in db.rows("recommendations")}
    head = recs["Head to head: GRIT vs QLoRA"]
    refusal = res["comparisons"]["grit vs qlora"]["behaviour"]["refusal"]
    significant = refusal["p_adjusted"] < 0.05
    assert head["recommendation"].startswith("grit vs qlora: ")
    assert ("grit refuses more unsafe prompts (80 points)" in head["recommendation"]) == significant
    cited = {ref["id"] for item in head["evidence"]["items"] for ref in item["refs"]}
    assert cited == set(stored)
    md = (tmp_path / "m07" / "report.md").read_text()
    assert "Head to head: GRIT vs QLoRA" in md and "paired_jackknife" in md


def test_bias_corrected_estimates_lead_the_aqi_table_and_chart(run_db, tmp_path):
    """With bias-corrected rows recorded (what fteval test writes), the report shows them with their interval and
    the plug-in value beside them, as the printed summary does; the chart and the frontier use them too."""
    with ExperimentDB(run_db) as db:
        eid = next(e["id"] for e in db.rows("experiments") if e["method"] == "aqi_eval")
        raw = {r["model"]: r for r in db.rows("aqi_scores", experiment_id=eid, metric="aqi_bounded") if r["layer"] is None}
        db.add_aqi_scores(eid, [{"model": m, "metric": "aqi_bounded_bc", "value": r["value"] / 2, "ci_low": r["value"] / 4,
                                 "ci_high": r["value"], "n_samples": r["n_samples"]} for m, r in raw.items()])
    out = tmp_path / "m07"
    assert report(run_db, out) == 0
    md = (out / "report.md").read_text()
    for m, r in raw.items():
        assert f"{r['value'] / 2:.4g} [{r['value'] / 4:.4g}, {r['value']:.4g}] (as computed {r['value']:.4g})" in md
    chart = next(c for c in _chart_specs((out / "report.html").read_text()) if c["id"] == "chart-aqi")
    assert {c["name"]: c["value"] for c in chart["categories"]} == pytest.approx({m: r["value"] / 2 for m, r in raw.items()})


def test_report_adds_the_controls_section_and_refuses_a_broken_controls_file(run_db, tmp_path):
    """A controls.json of `fteval bench controls` becomes a section; a file that is not one is a clear error."""
    from tests.controls.test_table import PLANTED_REFUSAL_KEEP, PLANTED_SEPARATION, _results
    from fteval.controls.table import aligned_base_row, seed_rows, summarise_seeds

    results = _results(0, PLANTED_SEPARATION, PLANTED_REFUSAL_KEEP)
    align = _results(3, {"baseline": 0.4, "aligned": 3.0}, {"aligned": 1.0}, variants=["baseline", "aligned"])
    rows = seed_rows(results, 42)
    payload = {"aligned_base": aligned_base_row(align, None, 0.8, 0.2), "rows": rows, "over_seeds": summarise_seeds(rows)}
    controls = tmp_path / "controls.json"
    controls.write_text(json.dumps(payload))
    out = tmp_path / "with_controls"
    assert report(run_db, out, controls=controls) == 0
    md = (out / "report.md").read_text()
    assert "## Known-answer controls" in md
    row = next(r for r in rows if r["control"] == "harmful-form/qlora")
    assert f"| 42 | harmful-form/qlora | {row['refusal']['delta']:+.2f}" in md and "detected" in md
    assert "Known-answer controls" in (out / "report.html").read_text()
    assert md.index("## Known-answer controls") < md.index("## Data export")
    broken = tmp_path / "broken.json"
    broken.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a controls.json"):
        report(run_db, tmp_path / "refused", controls=broken)
    assert not (tmp_path / "refused").exists()
