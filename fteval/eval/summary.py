"""The printed summary block of ``fteval test`` (the spec's BASELINE / QLORA / GRIT / DELTA-AQI layout)."""

from __future__ import annotations


def _fmt_ci(ci) -> str:
    if ci is None:
        return " [CI †]"
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def format_summary(results: dict) -> str:
    """The spec's summary block: per model AQI, XBI, CHI (with 95% CIs), then each Delta-AQI."""
    lines = []
    flagged = False
    for name, entry in results["models"].items():
        s = entry["scores"]
        ci = {m: v for m, v in entry.get("ci", {}).items()}
        for m in entry.get("ci_unreliable", []):
            ci[m] = None
            flagged = True
        lines.append(f"{name.upper()} MODEL ({entry['n_safe']} safe / {entry['n_unsafe']} unsafe prompts):")
        lines.append(f"├── AQI Score: {s['aqi']:.4g}{_fmt_ci(ci.get('aqi', ()))}")
        lines.append(f"├── AQI (bounded, 0-1): {s['aqi_bounded']:.4f}{_fmt_ci(ci.get('aqi_bounded', ()))}")
        lines.append(f"├── XBI (lower=better): {s['xbi']:.4g}{_fmt_ci(ci.get('xbi', ()))}")
        beh = entry.get("behaviour")
        lines.append(f"{'├──' if beh else '└──'} CHI (higher=better): {s['chi']:.4g}{_fmt_ci(ci.get('chi', ()))}")
        if beh:
            rates = beh["rates"]
            extra = []
            if "refusal_rate" in rates:
                r = rates["refusal_rate"]
                extra.append(f"Safety Refusal Rate: {100 * r['value']:.1f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] "
                             f"({r['n_samples']} unsafe; incl. partial {100 * rates['refusal_rate_incl_partial']['value']:.1f}%)")
            if "over_refusal_rate" in rates:
                r = rates["over_refusal_rate"]
                extra.append(f"Over-refusal (safe prompts): {100 * r['value']:.1f}% ({r['n_samples']} safe)")
            if beh.get("geval"):
                extra.append("G-Eval (1-5): " + ", ".join(f"{k} {v:.2f}" for k, v in beh["geval"].items()))
            for i, text in enumerate(extra):
                lines.append(f"{'└──' if i == len(extra) - 1 else '├──'} {text}")
        lines.append("")
    if flagged:
        lines.append("† single-model bootstrap CI not shown: its resamples are shifted away from the estimate")
        lines.append("  (duplicated prompts shrink within-class scatter when prompts are few for the hidden size);")
        lines.append("  see bootstrap_bias in aqi_results.json and read the paired Delta below.")
        lines.append("")
    for name, d in results["deltas"].items():
        a = d["aqi"]
        sig = ""
        if a.get("p_value") is not None:
            mark = "✓" if a.get("significant") else "✗"
            sig = f"  p={a['p_value']:.3g} (adjusted {a.get('p_adjusted', a['p_value']):.3g}) p<0.05 {mark}"
        lines.append(f"DELTA-AQI ({name} - baseline): {a['delta']:+.4g}{_fmt_ci(a['ci'] or ())}{sig}")
        b = d["aqi_bounded"]
        lines.append(f"  bounded: {b['delta']:+.4f}{_fmt_ci(b['ci'] or ())}; per-prompt silhouette diff "
                     f"{d['silhouette_ttest']['mean_diff']:+.4f} (Cohen's d {d['silhouette_ttest']['cohens_d']:.3f})")
    return "\n".join(lines)
