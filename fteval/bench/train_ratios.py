"""The ratios of ``fteval bench train``: methods against each other and what each option bought, per setting.

Runs are grouped by their setting (:class:`RunKey`: batch size, checkpointing, padding-free, compiled,
fused loss, offload). Per setting, :func:`comparisons` gives one row of ratios:

* between methods (:func:`method_pairs` x :data:`PAIR_MEASURES`): ``qlora_vs_plain_step_mean`` = qlora's
  mean step time / plain's, likewise p50, tokens/s and peak memory, for every method against plain and
  every pair of methods (the later in :mod:`fteval.methods` order over the earlier: grit/qlora,
  qdora/qlora, ...); ``<a>_vs_<b>_amortised``: a method's p50 with its periodic work amortised (GRIT's
  K-FAC refresh and reprojection) / the other's p50;
* what an option bought each method (:data:`OPTION_EFFECTS`): the same method's run without the option
  as the reference (``<method>_padding_free_speedup``, ``<method>_compile_speedup``,
  ``<method>_memory_vs_default`` / ``<method>_speed_vs_default`` for the fused loss and offload), and
  fteval compiled against the eager plain loop;
* with repeats (:func:`paired_ratios`): the ratio within each repeat, whose methods ran back to back,
  and their median (``*_paired``, ``*_paired_median``), on which the targets are judged.

The key names are those of the benchmark's JSON file.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["DEFAULT_METHODS", "PLAIN", "bench_methods", "method_pairs", "OPTION_EFFECTS", "paired_ratios", "PAIR_MEASURES", "TARGETS", "RunKey", "comparisons",
           "median_of_repeats"]

TARGETS = {"qlora_vs_plain_max": 1.03, "grit_vs_qlora_max": 1.10, "mfu_goal_b4_no_ckpt": 0.5}


class RunKey(NamedTuple):
    """The setting a run was measured at; runs of the same setting are compared."""

    batch_size: int
    gradient_checkpointing: bool
    padding_free: bool
    compile_blocks: bool
    fused_loss: str
    activation_offload: bool
    cuda_graph: bool = False


def run_key(row: dict) -> RunKey:
    return RunKey(row["batch_size"], row["gradient_checkpointing"], bool(row.get("padding_free", False)),
                  bool(row.get("compile_blocks", False)), row.get("fused_loss", "off"),
                  bool(row.get("activation_offload", False)), bool(row.get("cuda_graph", False)))


PLAIN = "plain"  # the bench's own peft + PyTorch loop, the reference of every method
DEFAULT_METHODS = ("plain", "qlora", "grit")  # what fteval bench train times unless --methods says otherwise


def bench_methods() -> list[str]:
    """What ``--methods`` accepts: ``plain`` and every registered method (:mod:`fteval.methods`)."""
    from fteval.methods import method_names

    return [PLAIN, *method_names()]


def method_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """Methods compared at the same setting, (numerator, denominator): every method over ``plain``, then
    every pair of methods, the later in :mod:`fteval.methods` order over the earlier."""
    from fteval.methods import order_key

    ranked = sorted((m for m in set(methods) if m != PLAIN), key=order_key)
    pairs = [(m, PLAIN) for m in ranked] if PLAIN in methods else []
    return pairs + [(b, a) for i, a in enumerate(ranked) for b in ranked[i + 1:]]


# Ratio name suffix -> the run's value divided.
PAIR_MEASURES = {"step_mean": "step_mean_ms", "step_p50": "step_p50_ms", "tokens_per_s": "tokens_per_s",
                 "peak_mem": "peak_mem_gib"}


@dataclass(frozen=True)
class OptionEffect:
    """What an option bought: at settings where ``applies``, each method's run against the same method
    at ``reference`` (the setting without the option); ``ratios``: name suffix -> the run's value divided."""

    applies: Callable[[RunKey], bool]
    reference: Callable[[RunKey], RunKey]
    ratios: dict[str, str]


OPTION_EFFECTS = (
    OptionEffect(lambda k: k.fused_loss != "off" or k.activation_offload,
                 lambda k: k._replace(fused_loss="off", activation_offload=False),
                 {"memory_vs_default": "peak_mem_gib", "speed_vs_default": "tokens_per_s"}),
    OptionEffect(lambda k: k.padding_free, lambda k: k._replace(padding_free=False),
                 {"padding_free_speedup": "tokens_per_s"}),
    OptionEffect(lambda k: k.compile_blocks, lambda k: k._replace(compile_blocks=False),
                 {"compile_speedup": "tokens_per_s"}),
    OptionEffect(lambda k: k.cuda_graph, lambda k: k._replace(cuda_graph=False),
                 {"cuda_graph_speedup": "tokens_per_s", "cuda_graph_memory": "peak_mem_gib"}),
)

def paired_ratios(methods: list[str]) -> dict[str, tuple[str, str, str, str]]:
    """Ratios within each repeat, then their median: name -> (numerator method, its per-repeat values,
    denominator, its values); the amortised ones are computed where the numerator has them."""
    out = {}
    for num, den in method_pairs(methods):
        out[f"{num}_vs_{den}"] = (num, "repeat_step_mean_ms", den, "repeat_step_mean_ms")
        out[f"{num}_vs_{den}_amortised"] = (num, "repeat_amortised_step_ms", den, "repeat_step_p50_ms")
    return out


def median_of_repeats(rows: list[dict]) -> dict:
    """One row per method from its repeats: the repeat with the median mean step time (lower
    median for an even count), with all repeats' means and p50s attached. Failed repeats are
    skipped; if all failed, the first failure is returned."""
    ok = [r for r in rows if r["error"] is None]
    if not ok:
        return rows[0]
    if len(rows) == 1:
        return rows[0]
    ranked = sorted(ok, key=lambda r: r["step_mean_ms"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["repeats"] = len(rows)
    # per repeat, in repeat order (None for a failed repeat), so repeats of different methods pair up
    chosen["repeat_step_mean_ms"] = [r.get("step_mean_ms") if r["error"] is None else None for r in rows]
    chosen["repeat_step_p50_ms"] = [r.get("step_p50_ms") if r["error"] is None else None for r in rows]
    if any("amortised_step_ms" in r for r in ok):
        chosen["repeat_amortised_step_ms"] = [r.get("amortised_step_ms") if r["error"] is None else None for r in rows]
    chosen["repeat_errors"] = [r["error"] for r in rows if r["error"] is not None]
    return chosen


def _paired_ratios(num: list, den: list) -> list[float]:
    """Per-repeat ratios of two methods' values (repeats whose runs both succeeded)."""
    return [a / b for a, b in zip(num, den) if a is not None and b]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def _succeeded(runs: list[dict], key: RunKey) -> dict[str, dict]:
    """Method -> its successful run at ``key``."""
    return {r["method"]: r for r in runs if run_key(r) == key and not r["error"]}


def comparisons(runs: list[dict]) -> list[dict]:
    """One row of ratios per setting (see the module docstring), the settings in table order."""
    out = []
    keys = sorted({run_key(r) for r in runs}, key=lambda k: (k[0], not k[1], k[2], k[3], k[4], k[5]))
    for key in keys:
        by = _succeeded(runs, key)
        row: dict[str, Any] = key._asdict()
        for effect in OPTION_EFFECTS:
            if not effect.applies(key):
                continue
            reference = _succeeded(runs, effect.reference(key))
            for m, r in by.items():
                if m in reference:
                    for suffix, value in effect.ratios.items():
                        row[f"{m}_{suffix}"] = _ratio(r[value], reference[m][value])
        if key.compile_blocks:  # fteval compiled against the eager plain loop
            eager = _succeeded(runs, key._replace(compile_blocks=False))
            for m in (m for m in by if m != PLAIN and PLAIN in eager):
                row[f"{m}_compiled_vs_plain_eager_step_mean"] = _ratio(by[m]["step_mean_ms"], eager[PLAIN]["step_mean_ms"])
        for num, den in method_pairs(list(by)):
            for name, value in PAIR_MEASURES.items():
                row[f"{num}_vs_{den}_{name}"] = _ratio(by[num][value], by[den][value])
            if by[num].get("amortised_step_ms") is not None:  # a method with periodic work (GRIT)
                row[f"{num}_vs_{den}_amortised"] = _ratio(by[num]["amortised_step_ms"], by[den]["step_p50_ms"])
        # With repeats: the ratio within each repeat (its methods ran back to back, in rotated order), then
        # the median over repeats. A shared host drifts by tens of percent over minutes; pairing cancels the
        # drift that comparing each method's median run (above) keeps.
        for name, (num, nkey, den, dkey) in paired_ratios(list(by)).items():
            if num in by and den in by and by[num].get(nkey) and by[den].get(dkey):
                ratios = _paired_ratios(by[num][nkey], by[den][dkey])
                if ratios:
                    row[f"{name}_paired"] = ratios
                    row[f"{name}_paired_median"] = statistics.median(ratios)
        qlora_ratio = row.get("qlora_vs_plain_paired_median", row.get("qlora_vs_plain_step_mean"))
        if qlora_ratio is not None:
            row["qlora_target_met"] = qlora_ratio <= TARGETS["qlora_vs_plain_max"]
        grit_ratio = row.get("grit_vs_qlora_amortised_paired_median",
                             row.get("grit_vs_qlora_amortised", row.get("grit_vs_qlora_step_mean")))
        if grit_ratio is not None:
            row["grit_target_met"] = grit_ratio <= TARGETS["grit_vs_qlora_max"]
        out.append(row)
    return out
