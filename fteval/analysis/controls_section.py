"""The report's "Known-answer controls" section, from the ``controls.json`` of ``fteval bench controls``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fteval.analysis.document import Block, Heading, Para, Table
from fteval.controls.table import row_verdict

__all__ = ["controls_blocks", "read_controls"]


def read_controls(path: Path) -> Optional[dict]:
    """The controls payload, or None when there is none; an unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        payload["rows"], payload["over_seeds"], payload["aligned_base"]  # noqa: B018 (shape check)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a controls.json written by `fteval bench controls` ({exc}); "
                         "run that command again or pass --controls to another file") from None
    return payload


def _ci(ci, spec: str) -> str:
    return f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else ""


def controls_blocks(payload: dict) -> list[Block]:
    """Heading, the aligned base's line, the per-seed detection table and the over-seeds rates."""
    a = payload["aligned_base"]
    blocks: list[Block] = [Heading(2, "Known-answer controls", "controls")]
    al = a["aligned"]
    rate = lambda e, k: f"{e[k]['value']:.0%}" if k in e else "-"  # noqa: E731
    blocks.append(Para(
        f"Aligned base (from `fteval bench controls`): refusal {rate(al, 'refusal_rate')}, over-refusal "
        f"{rate(al, 'over_refusal_rate')}, bounded AQI {al['aqi_bounded']:.4f} (raw model: refusal "
        f"{rate(a['raw'], 'refusal_rate')}, bounded AQI {a['raw']['aqi_bounded']:.4f}); targets "
        f"{'met' if a['meets_all'] else 'not met'}."))
    rows = []
    for r in payload["rows"]:
        rf, aq = r["refusal"], r["aqi_bounded"]
        verdict = row_verdict(r)
        rows.append([str(r["seed"]), r["control"], f"{rf['delta']:+.2f}{_ci(rf['ci'], '+.2f')}", f"{rf['p_adjusted']:.2g}",
                     f"{aq['delta']:+.4f}{_ci(aq['ci'], '+.4f')}", f"{aq['p_adjusted']:.2g}", verdict])
    blocks.append(Table(["seed", "control", "Delta refusal", "adj. p", "Delta bounded AQI", "adj. p", "result"], rows))
    over = payload["over_seeds"]
    summary = []
    for name, e in over["controls"].items():
        k = e.get("detected") or e.get("flagged")
        if k is not None:
            what = "detected" if "detected" in e else "flagged"
            summary.append([name, f"{what} {k['count']}/{k['n']}{_ci(k['ci'], '.2f')}"])
        else:
            summary.append([name, f"erosion GRIT - QLoRA: refusal {e['refusal']['mean']:+.3f}{_ci(e['refusal']['ci'], '+.3f')}, "
                                  f"AQI {e['aqi_bounded']['mean']:+.4f}{_ci(e['aqi_bounded']['ci'], '+.4f')}"])
    blocks.append(Table(["control", f"over {over['n_seeds']} seed(s), Clopper-Pearson / t 95%"], summary))
    blocks.append(Para("Delta = fine-tuned - reference on held-out prompts; p Holm-adjusted over one seed's table. "
                       "Positive controls are detected when both Deltas are significant, nulls flagged when either is.",
                       note=True))
    return blocks
