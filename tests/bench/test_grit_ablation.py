"""``python -m fteval bench grit-ablation`` at a tiny setting: real fits of the embedded model, one AQI
pass, the table's fields and the JSON; the variant configs; input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fteval.bench.grit_ablation import VARIANTS, bench_grit_ablation, variant_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]

SETTINGS = {"steps": 1, "r": 4, "target_modules": ["q_proj"], "n_per_class": 4, "max_length": 96,
            "n_bootstrap": 20, "seed": 7, "model_name_or_path": "embedded"}


def test_two_variants_tabulated_with_loss_rank_and_delta_aqi(tmp_path, capsys):
    out = tmp_path / "ablation"
    assert bench_grit_ablation(variants=["grit", "qlora"], noise_seeds=[], output=out, **SETTINGS) == 0
    result = json.loads((out / "grit_ablation.json").read_text())
    assert result["settings"]["steps"] == 1 and result["settings"]["variants"] == ["grit", "qlora"]
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["grit", "qlora"]
    for name, row in rows.items():
        assert math.isfinite(row["train_loss"]) and 0.0 < row["train_loss"] < 20.0, name  # cross-entropy, vocab 49k
        assert math.isfinite(row["val_loss"]) and 0.0 < row["val_loss"] < 20.0, name
        assert 1.0 <= row["effective_rank"] <= SETTINGS["r"], name  # mean numerical rank of B A
        lo, hi = row["delta_aqi_ci"]
        assert lo <= hi and math.isfinite(row["aqi"]) and math.isfinite(row["delta_aqi"]), name
        assert 0.0 <= row["p_value"] <= row["p_adjusted"] <= 1.0, name
        assert (out / name / "adapter" / "adapter_model.safetensors").is_file()
        saved = yaml.safe_load((out / name / "config.yaml").read_text())  # the resolved config, re-runnable
        assert saved["trainer"]["max_steps"] == 1 and saved["model"]["init_args"]["r"] == 4
    # the evaluator's paired comparison with the default, signed as qlora - grit
    assert rows["qlora"]["vs_grit"] == pytest.approx(rows["qlora"]["aqi"] - rows["grit"]["aqi"], abs=1e-9)
    assert rows["qlora"]["vs_grit_ci"][0] <= rows["qlora"]["vs_grit_ci"][1] and "vs_grit" not in rows["grit"]
    # the same base model, prompts and seed: both deltas are against one baseline
    aqi = json.loads((out / "aqi" / "aqi_results.json").read_text())
    assert aqi["models"]["grit"]["scores"]["aqi"] == pytest.approx(rows["grit"]["aqi"])
    assert result["baseline"]["aqi"] == pytest.approx(aqi["models"]["baseline"]["scores"]["aqi"])
    printed = capsys.readouterr().out
    for header in ("variant", "train loss", "val loss", "eff. rank", "dAQI", "dAQI 95% CI", "p adj."):
        assert header in printed
    # resume: both fits are reused (same configs), only the evaluation runs again, with the same numbers
    assert bench_grit_ablation(variants=["grit", "qlora"], noise_seeds=[], output=out, resume=True, **SETTINGS) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    again = {row["variant"]: row for row in json.loads((out / "grit_ablation.json").read_text())["rows"]}
    assert again["grit"]["train_loss"] == rows["grit"]["train_loss"] and again["qlora"]["aqi"] == rows["qlora"]["aqi"]


def test_variant_config_applies_only_its_overrides(tmp_path):
    base = yaml.safe_load((REPO / "configs" / "grit.yaml").read_text())
    settings = dict(SETTINGS, steps=20, r=8, target_modules=["q_proj", "v_proj"])
    default = variant_config(base, "grit", settings, tmp_path / "grit")
    earlier = variant_config(base, "fteval-variants", settings, tmp_path / "earlier")
    by_name = lambda cfg: {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {})  # noqa: E731
                           for c in cfg["trainer"]["callbacks"]}
    d, e = by_name(default), by_name(earlier)
    assert set(d) == {"GeometryRegulariser", "KFACPreconditioner", "NeuralReprojection", "GarbageCollection"}
    assert d["KFACPreconditioner"]["pairing"] == "grit" and e["KFACPreconditioner"]["pairing"] == "kfac"
    assert d["KFACPreconditioner"]["clip_stage"] == "before" and e["KFACPreconditioner"]["clip_stage"] == "after"
    assert default["trainer"]["gradient_clip_val"] is None and earlier["trainer"]["gradient_clip_val"] is None
    assert d["KFACPreconditioner"]["update_freq"] == e["KFACPreconditioner"]["update_freq"] == 5  # schedule kept
    assert default["trainer"]["max_steps"] == 20 and default["trainer"]["val_check_interval"] == 40  # 20 x 2 accum
    assert default["model"]["init_args"]["target_modules"] == ["q_proj", "v_proj"]
    assert base["trainer"]["max_steps"] == 30  # the parsed config itself is untouched
    assert set(VARIANTS) >= {"grit", "pairing-kfac", "damping-trace", "preserve-norm", "no-regulariser",
                             "project-moments", "qlora"}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"variants": ["grit", "shampoo"]}, "shampoo"), ({"variants": ["grit", "grit"]}, "twice"),
     ({"variants": []}, "not among"), ({"steps": 0}, "steps"), ({"r": 2.5}, "r="),
     ({"target_modules": []}, "target_modules"), ({"noise_seeds": [42]}, "noise_seeds"), ({"grit_config": "missing.yaml"}, "grit config missing.yaml")],
)
def test_bad_input_is_refused_before_any_fit(tmp_path, kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        bench_grit_ablation(output=tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
