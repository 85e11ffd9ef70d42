"""The method registry's extension point: a method defined and registered in this file alone runs
fit -> test -> compare -> report on the embedded model, beside QLoRA, with its metrics under its own name.

Nothing in fteval names the toy method: the database, the run logger, ``compare`` and ``report`` learn
it from :mod:`fteval.methods` and from the method recorded with each run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from fteval.__main__ import main
from fteval.db import ExperimentDB
from fteval.methods import get_method, method_names, method_of, register_method, unregister
from fteval.models.qlora import QLoRAModule

ROOT = Path(__file__).resolve().parents[1]


@register_method("toy", display_name="Toy LoRA", metric_prefixes=("toy/",), quantises_base=False,
                 description="LoRA that also logs its adapters' total norm (the registry's test method)")
class ToyModule(QLoRAModule):
    """peft LoRA that logs ``toy/adapter_norm`` (L2 norm of all adapter weights) every step."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in self.trainable_parameters()]))
        self.log("toy/adapter_norm", norm, on_step=True, on_epoch=False)
        return loss


def _trainer(name: str) -> dict:
    return {"accelerator": "cpu", "devices": 1, "max_steps": 3, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "lightning_logs", "name": name}},
            "callbacks": [{"class_path": "callbacks.run_logger.ExperimentDBLogger",
                           "init_args": {"db_path": "output/centralized.db"}}]}


def _fit(class_path: str, name: str) -> dict:
    return {"seed_everything": 1, "trainer": _trainer(name),
            "model": {"class_path": class_path,
                      "init_args": {"quantization": "none", "r": 2, "alpha": 4, "dropout": 0.0,
                                    "target_modules": ["q_proj"], "export_dir": f"output/{name}/adapter",
                                    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}},
            "data": {"max_train_samples": 12, "max_length": 48, "batch_size": 2, "n_per_class": 4}}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return tmp_path


def test_registered_toy_method_runs_fit_test_compare_report(in_tmp):
    assert "toy" in method_names() and get_method("toy").module_class() is ToyModule
    assert ToyModule.method_name == "toy" and method_of(ToyModule()).display_name == "Toy LoRA"
    for class_path, name in ((f"{__name__}.ToyModule", "toy"), ("fteval.models.QLoRAModule", "qlora")):
        (in_tmp / f"{name}.yaml").write_text(yaml.safe_dump(_fit(class_path, name)))
        main(["fit", "--config", f"{name}.yaml"])
    test = {"seed_everything": 1, "trainer": {**_trainer("aqi"), "max_steps": -1},
            "model": {"class_path": "fteval.eval.AQIEvaluator",
                      "init_args": {"quantization": "none", "adapters": {"qlora": "output/qlora/adapter",
                                                                         "toy": "output/toy/adapter"},
                                    "behaviour": False, "n_bootstrap": 1, "save_embeddings": False,
                                    "results_dir": "output/aqi"}},
            "data": {"n_per_class": 6, "eval_batch_size": 12}}
    (in_tmp / "aqi.yaml").write_text(yaml.safe_dump(test))
    main(["test", "--config", "aqi.yaml"])
    main(["compare", "--db_path", "output/centralized.db", "--output_dir", "output/compare"])
    main(["report", "--db_path", "output/centralized.db", "--output_dir", "output/report"])

    with ExperimentDB(in_tmp / "output" / "centralized.db") as db:
        fits = {e["method"]: e for e in db.experiments(stage="fit")}
        assert set(fits) == {"toy", "qlora"} and all(e["status"] == "finished" for e in fits.values())
        toy_rows = db.rows("training_metrics", experiment_id=fits["toy"]["id"])
        assert {r["method"] for r in toy_rows} == {"toy"}  # its own name, not filed as QLoRA's
        norms = [r["value"] for r in sorted(toy_rows, key=lambda r: r["step"]) if r["name"] == "toy/adapter_norm"]
        assert len(norms) == 3 and norms[-1] > norms[0] > 0  # the adapters grew from B = 0
        assert not [r for r in db.rows("training_metrics", experiment_id=fits["qlora"]["id"]) if r["name"].startswith("toy/")]
        scored = {r["model"] for r in db.rows("aqi_scores")}
        assert {"baseline", "qlora", "toy"} <= scored
        # the evaluation tests every pair of its models (toy against qlora too), Holm over the family
        pairs = {frozenset((t["group_a"], t["group_b"])): t for t in db.rows("statistical_tests")
                 if t["test"] == "paired_jackknife" and t["metric"] == "aqi_bounded"}
        assert set(pairs) == {frozenset(p) for p in (("qlora", "baseline"), ("toy", "baseline"), ("toy", "qlora"))}
        assert all(t["correction"] == "holm" and t["p_adjusted"] >= t["p_value"] for t in pairs.values())
        training_tests = [t for t in db.rows("statistical_tests") if (t["details"] or {}).get("analysis") == "training_comparison"]
        assert any({t["group_a"].split("#")[0], t["group_b"].split("#")[0]} == {"toy", "qlora"} for t in training_tests)
    comparison = (in_tmp / "output" / "compare" / "comparison.md").read_text()
    assert "toy#" in comparison and "toy/adapter_norm (last step)" in comparison
    report = (in_tmp / "output" / "report" / "report.md").read_text()
    assert "toy#" in report and "toy/adapter_norm (last step)" in report
    adapter = json.loads((in_tmp / "output" / "toy" / "adapter" / "fteval_run.json").read_text())
    assert adapter["method"] == "toy"


def test_registry_rejects_conflicts_and_reserved_names():
    from fteval.methods import Method, MethodError, register

    with pytest.raises(MethodError, match="unknown method 'sft'; registered methods are qlora, grit, qdora, lora"):
        get_method("sft")
    with pytest.raises(MethodError, match="already registered"):
        register(Method("qlora", "Other", "somewhere.Else"))
    for bad in ("baseline", "plain", "Two Words", "", "a#b"):
        with pytest.raises(MethodError):
            register(Method(bad, bad, "x.Y"))
    assert get_method("QLoRA").display_name == "QLoRA"  # case-insensitive lookup

    @register_method("tmp-method")
    class Tmp(QLoRAModule):
        pass

    try:
        assert get_method("tmp-method").quantises_base  # QLoRAModule's quantization default is nf4
        assert method_names()[-1] == "tmp-method"
    finally:
        unregister("tmp-method")
    assert "tmp-method" not in method_names()


def test_no_code_outside_the_registry_compares_method_names():
    """Method names are compared nowhere but in fteval/methods.py (the GRIT ablation's arms are config names,
    GRIT's ``pairing: grit`` is another concept)."""
    import re

    pattern = re.compile(r"""(==|!=)\s*["'](qlora|grit|qdora|lora)["']|["'](qlora|grit|qdora|lora)["']\s+(not\s+)?in\s""")
    allowed = {Path("fteval/methods.py"), Path("fteval/bench/grit_ablation.py")}
    found = [f"{p}:{i}: {line.strip()}" for folder in ("fteval", "callbacks") for p in sorted((ROOT / folder).rglob("*.py"))
             if p.relative_to(ROOT) not in allowed and not p.relative_to(ROOT).parts[:2] == ("fteval", "grit")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
