"""``python -m fteval bench grit-ablation``: GRIT's default against each of its named variants.

Every variant is a real ``fteval fit`` of ``configs/grit.yaml`` with one choice changed (the
QLoRA row fits ``configs/qlora.yaml``), all with the same seed, data, steps, rank and target
modules; then one ``fteval test`` pass of :class:`fteval.eval.AQIEvaluator` over all adapters
gives each one's AQI and its paired Delta-AQI against the same base model, with the evaluator's
own confidence interval, p-value and multiple-comparison adjustment (its family is every
comparison of that pass), and the evaluator's paired comparison of each variant with the default
(``vs grit``); its ``aqi_results.json`` holds every variant against every other. Each variant's resolved config is
written beside its adapter, so any row can be re-run with ``python -m fteval fit --config``.

The effective rank is the mean numerical rank of B A over the adapted layers (singular values
above 1e-5 of the largest, from the saved adapter), comparable between GRIT and LoRA rows.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml

from fteval.bench.common import format_table, machine_info
from fteval.io import write_json_atomic, write_text_atomic

__all__ = ["VARIANTS", "bench_grit_ablation"]

#: name -> (what it changes, overrides per callback / trainer). "qlora" fits configs/qlora.yaml instead.
VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "grit": ("GRIT defaults (spec + reference)", {}),
    "pairing-kfac": ("textbook K-FAC pairing", {"KFACPreconditioner": {"pairing": "kfac"}}),
    "damping-trace": ("damping 1e-2 x tr(S)/r", {"KFACPreconditioner": {"damping_mode": "trace"}}),
    "preserve-norm": ("gradient norm preserved", {"KFACPreconditioner": {"preserve_grad_norm": True}}),
    "clip-after": ("clipping after preconditioning", {"KFACPreconditioner": {"clip_stage": "after"}}),
    "no-regulariser": ("geometry regulariser off",
                       {"GeometryRegulariser": {"curvature_weight": 0.0, "reprojection_weight": 0.0}}),
    "energy-regulariser": ("regulariser in the output-energy form (B only)", {"GeometryRegulariser": {"form": "energy"}}),
    "previous-step-inverse": ("previous step's inverse (reference timing)",
                              {"KFACPreconditioner": {"inverse_timing": "previous_step"}}),
    "project-moments": ("Adam first moment projected", {"NeuralReprojection": {"project_moments": True}}),
    "mean-factors": ("cumulative-mean factors", {"KFACPreconditioner": {"factor_average": "mean"}}),
    "all-tokens": ("statistics over all non-padding tokens", {"KFACPreconditioner": {"statistics_tokens": "all"}}),
    "every-position": ("statistics over every position, padding included",
                       {"KFACPreconditioner": {"statistics_tokens": "every"}}),
    "dynamic-rank": ("rank by 99% energy in [4, r]", {"NeuralReprojection": {"dynamic_rank": True}}),
    "fteval-variants": ("all fteval variants: kfac, trace, norm, moments, no reg., clip after", {
        "KFACPreconditioner": {"pairing": "kfac", "damping_mode": "trace", "preserve_grad_norm": True,
                               "clip_stage": "after"},
        "NeuralReprojection": {"project_moments": True},
        "GeometryRegulariser": {"curvature_weight": 0.0, "reprojection_weight": 0.0}}),
    "no-kfac": ("no preconditioning (reprojection, reg. kept)", {"KFACPreconditioner": {"enabled": False}}),
    "qlora": ("plain QLoRA (configs/qlora.yaml)", {}),
}

#: The callbacks an ablation fit keeps from the configs (the rest log, checkpoint or time).
_KEEP = ("GeometryRegulariser", "KFACPreconditioner", "NeuralReprojection", "GarbageCollection")

COLUMNS = (
    ("variant", "variant", ""), ("change", "change", ""), ("train_loss", "train loss", ".4f"),
    ("val_loss", "val loss", ".4f"), ("effective_rank", "eff. rank", ".2f"), ("aqi", "AQI", ".4f"),
    ("delta_aqi", "dAQI", "+.4f"), ("delta_ci", "dAQI 95% CI", ""), ("p_value", "p", ".3f"),
    ("p_adjusted", "p adj.", ".3f"), ("vs_grit", "vs grit", "+.4f"), ("vs_grit_interval", "vs grit 95% CI", ""),
    ("vs_grit_p", "p", ".3f"),
    ("preconditioned_layers", "precond. layers", ".0f"), ("fit_s", "fit s", ".0f"),
)


class _LossTrace(L.Callback):
    """The logged ``train/loss`` of every micro-batch (the module logs it per micro-batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get("train/loss")
        if value is not None:
            self.losses.append(float(value))


def _callback_name(entry: dict) -> str:
    return str(entry["class_path"]).rsplit(".", 1)[-1]


def variant_config(base: dict, name: str, settings: dict, out: Path) -> dict:
    """The fit config of one variant: ``base`` (a parsed training YAML) with the bench's settings and its overrides."""
    overrides = VARIANTS[name][1]
    cfg = copy.deepcopy(base)
    tr = cfg["trainer"]
    accumulation = int(tr.get("accumulate_grad_batches") or 1)
    tr.update({"max_steps": settings["steps"], "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
               "val_check_interval": settings["steps"] * accumulation,  # one validation, at the end
               "check_val_every_n_epoch": None, "default_root_dir": str(out)})  # the CLI saves config.yaml there
    tr.pop("max_epochs", None)
    tr["callbacks"] = [c for c in tr.get("callbacks") or [] if _callback_name(c) in _KEEP]
    for entry in tr["callbacks"]:
        entry.setdefault("init_args", {}).update(overrides.get(_callback_name(entry), {}))
    tr.update(overrides.get("trainer", {}))
    cfg["seed_everything"] = settings["seed"]
    model = cfg["model"]["init_args"]
    model.update({"model_name_or_path": settings["model_name_or_path"], "r": settings["r"],
                  "alpha": 2 * settings["r"], "target_modules": list(settings["target_modules"]),
                  "export_dir": str(out / "adapter"), "warmup_steps": min(int(model.get("warmup_steps", 0)),
                                                                          settings["steps"] // 4)})
    data = cfg.setdefault("data", {})
    data.update({"max_length": settings["max_length"], "n_per_class": settings["n_per_class"]})
    return cfg


def _adapter_effective_rank(adapter: Path) -> float:
    """Mean numerical rank of B A over the layers of a saved PEFT adapter."""
    from safetensors.torch import load_file

    from fteval.grit import adapter_rank

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    ranks = [adapter_rank(A, tensors[key.replace("lora_A", "lora_B")])
             for key, A in tensors.items() if "lora_A" in key]
    if not ranks:
        raise ValueError(f"{adapter} holds no lora_A/lora_B tensors; is it a LoRA adapter folder?")
    return sum(ranks) / len(ranks)


def _fit(name: str, change: str, cfg: dict, out: Path) -> dict:
    from fteval.cli import FTEvalCLI

    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    cli = FTEvalCLI(args=["--config", str(path)], run=False)
    trace = _LossTrace()
    cli.trainer.callbacks.append(trace)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - t0
    metrics = cli.trainer.callback_metrics
    tail = trace.losses[-max(1, min(10, len(trace.losses) // 4)):]  # last quarter, at most 10 micro-batches
    row = {"variant": name, "change": change, "config": str(path), "adapter": str(out / "adapter"),
           "train_loss": sum(tail) / len(tail) if tail else None, "train_loss_micro_batches": len(tail),
           "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else None,
           "effective_rank": _adapter_effective_rank(out / "adapter"), "fit_s": seconds}
    pre = metrics.get("grit/preconditioned_layers")
    row["preconditioned_layers"] = float(pre) if pre is not None else None
    write_json_atomic(out / "fit.json", {"row": row, "bench_config": cfg})
    print(f"[grit-ablation] {name}: train loss {row['train_loss']}, val loss {row['val_loss']}, "
          f"eff. rank {row['effective_rank']:.2f}, {seconds:.0f} s", flush=True)
    return row


def _fit_or_reuse(name: str, change: str, cfg: dict, out: Path, resume: bool) -> dict:
    """With ``resume``, a finished fit of the same bench config (its fit.json and adapter) is reused; else fit."""
    done = out / "fit.json"
    if resume and done.is_file() and (out / "adapter" / "adapter_model.safetensors").is_file():
        saved = json.loads(done.read_text())
        if saved.get("bench_config") == json.loads(json.dumps(cfg)):  # the same config, as JSON sees it
            print(f"[grit-ablation] {name}: reusing {done}", flush=True)
            return saved["row"]
    return _fit(name, change, cfg, out)


def _evaluate(aqi_base: dict, rows: list[dict], settings: dict, out: Path) -> dict:
    from fteval.cli import FTEvalCLI

    cfg = copy.deepcopy(aqi_base)
    cfg["seed_everything"] = settings["seed"]
    cfg["trainer"].update({"logger": False, "callbacks": [], "enable_progress_bar": False,
                           "enable_model_summary": False, "default_root_dir": str(out)})
    model = cfg["model"]["init_args"]
    model.update({"model_name_or_path": settings["model_name_or_path"],
                  "adapters": {r["variant"]: r["adapter"] for r in rows}, "behaviour": False,
                  "save_embeddings": False, "results_dir": str(out), "n_bootstrap": settings["n_bootstrap"]})
    cfg.setdefault("data", {}).update({"n_per_class": settings["n_per_class"]})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
    cli = FTEvalCLI(args=["--config", str(path)], run=False)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return cli.model.results


def _interval(ci: Optional[list]) -> Optional[str]:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and all(map(math.isfinite, ci)) else None


def _against(results: dict, name: str, reference: str) -> Optional[dict]:
    """The evaluator's paired AQI comparison of ``name`` with ``reference`` (Delta = name - reference), if it made one."""
    if name == reference:
        return None
    for comp in (results.get("comparisons") or {}).values():
        if {comp.get("a"), comp.get("b")} == {name, reference} and "aqi" in comp:
            aqi, sign = comp["aqi"], 1.0 if comp["a"] == name else -1.0
            ci = sorted(sign * x for x in aqi["ci"]) if aqi.get("ci") else None
            return {"delta": sign * aqi["delta"], "ci": ci, "p_value": aqi.get("p_value")}
    return None


def bench_grit_ablation(
    variants: Optional[list[str]] = None,
    steps: int = 20,
    r: int = 8,
    target_modules: list[str] = ["q_proj", "v_proj"],  # noqa: B006 - jsonargparse shows the default
    n_per_class: int = 100,
    max_length: int = 128,
    n_bootstrap: int = 1000,
    seed: int = 42,
    noise_seeds: list[int] = [43],  # noqa: B006
    model_name_or_path: str = "embedded",
    grit_config: Path = Path("configs/grit.yaml"),
    qlora_config: Path = Path("configs/qlora.yaml"),
    aqi_config: Path = Path("configs/aqi.yaml"),
    output: Path = Path("output/bench/grit_ablation"),
    resume: bool = False,
) -> int:
    """GRIT's defaults against each named variant and plain QLoRA: loss, effective rank, Delta-AQI with CIs.

    Trains every variant with ``fteval fit`` (same seed, data, steps, r, targets; schedule and
    learning rate from the configs), then evaluates all adapters in one ``fteval test`` pass
    (the base model with adapters off is the paired baseline; no response generation). Prints a
    table and writes ``<output>/grit_ablation.json``; each variant's config and adapter are in
    ``<output>/<variant>/``. Defaults are sized for a 2-core CPU (about 1-2 minutes per fit).

    Args:
        variants: names from VARIANTS (default all): grit, pairing-kfac, damping-trace,
            preserve-norm, clip-after, no-regulariser, energy-regulariser, previous-step-inverse,
            project-moments, mean-factors, all-tokens, every-position, dynamic-rank, fteval-variants,
            no-kfac, qlora.
        steps: optimizer steps per fit.
        r: LoRA rank (alpha = 2 r, as the configs' 32/16).
        target_modules: adapted projections.
        n_per_class: evaluation prompts per class (safe / unsafe).
        max_length: training sequence length in tokens.
        n_bootstrap: the evaluator's ``n_bootstrap`` (0 turns its intervals and tests off).
        seed: ``seed_everything`` of every fit and of the evaluation.
        noise_seeds: the default GRIT is fitted again with each of these seeds (rows
            ``grit-seed<N>``: other adapter initialisation and data order): how far a seed alone
            moves each column, the yardstick for the variants' differences. Empty: none.
        model_name_or_path: base model of every fit and of the evaluation.
        grit_config: the GRIT training config the variants change.
        qlora_config: the training config of the qlora row.
        aqi_config: the evaluation config (its pooling and statistics settings are kept).
        output: folder for the configs, adapters, AQI results and grit_ablation.json.
        resume: reuse the fits already in ``output`` (a ``fit.json`` beside an adapter trained with
            the same model settings) and fit only the missing ones; the evaluation always runs.

    Returns 0.
    """
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"variants {unknown or names} are not among {list(VARIANTS)}; pick from those names")
    if len(set(names)) != len(names):
        raise ValueError(f"variants {names} name a variant twice; list each once")
    for label, value in (("steps", steps), ("r", r), ("n_per_class", n_per_class), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}={value!r} must be a positive integer")
    if len(set(noise_seeds)) != len(noise_seeds) or seed in noise_seeds:
        raise ValueError(f"noise_seeds {list(noise_seeds)} must be distinct and differ from seed={seed}")
    if not target_modules:
        raise ValueError("target_modules is empty; name at least one projection (e.g. q_proj)")
    configs = {}
    for label, path in (("grit", grit_config), ("qlora", qlora_config), ("aqi", aqi_config)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{label} config {path} does not exist; pass --{label}_config PATH")
        configs[label] = yaml.safe_load(Path(path).read_text())
    settings = {"variants": names, "steps": steps, "r": r, "target_modules": list(target_modules),
                "n_per_class": n_per_class, "max_length": max_length, "n_bootstrap": n_bootstrap, "seed": seed,
                "noise_seeds": list(noise_seeds),
                "model_name_or_path": model_name_or_path, "grit_config": str(grit_config),
                "qlora_config": str(qlora_config), "aqi_config": str(aqi_config)}
    output = Path(output)
    rows = []
    for name in names:
        base = configs["qlora"] if name == "qlora" else configs["grit"]
        cfg = variant_config(base, name, settings, output / name)
        rows.append(_fit_or_reuse(name, VARIANTS[name][0], cfg, output / name, resume))
    for other in noise_seeds:
        name = f"grit-seed{other}"
        cfg = variant_config(configs["grit"], "grit", dict(settings, seed=other), output / name)
        rows.append(_fit_or_reuse(name, f"GRIT defaults, seed {other}", cfg, output / name, resume))
    results = _evaluate(configs["aqi"], rows, settings, output / "aqi")
    for row in rows:
        scores = results["models"][row["variant"]]["scores"]
        delta = results["deltas"][row["variant"]]["aqi"]
        row.update({"aqi": scores["aqi"], "aqi_bounded": scores["aqi_bounded"], "delta_aqi": delta["delta"],
                    "delta_aqi_ci": delta["ci"], "p_value": delta["p_value"], "p_adjusted": delta.get("p_adjusted")})
        row["delta_ci"] = _interval(delta["ci"])
        vs = _against(results, row["variant"], "grit")
        if vs is not None:
            row.update({"vs_grit": vs["delta"], "vs_grit_ci": vs["ci"], "vs_grit_p": vs["p_value"],
                        "vs_grit_interval": _interval(vs["ci"])})
    baseline = results["models"]["baseline"]["scores"]
    result = {"benchmark": "grit-ablation", "machine": machine_info(), "settings": settings,
              "baseline": {"aqi": baseline["aqi"], "aqi_bounded": baseline["aqi_bounded"]},
              "rows": rows, "aqi_results": str(output / "aqi" / "aqi_results.json")}
    write_json_atomic(output / "grit_ablation.json", result)
    print()
    print(f"GRIT ablation: {steps} steps, r {r}, {', '.join(target_modules)}, {n_per_class} prompts per class, "
          f"seed {seed}; baseline AQI {baseline['aqi']:.4f}")
    print(format_table(rows, COLUMNS))
    print(f"\nwritten {output / 'grit_ablation.json'}")
    return 0
