"""The printed summary block of ``fteval test``: the spec's per-model layout, then every pair of models.

Every line leads with one estimate and the interval and test of that estimate (the bias-corrected
value); the plug-in value, where shown, follows in brackets as "as computed". Per model: the
headline (bounded AQI), the spec's AQI, XBI and CHI, the heavy-tail warning where it applies, the
behaviour rates. Per pair ("GRIT vs QLORA", "QLORA vs BASELINE", ...): the paired Deltas with CIs
and adjusted p-values, the Delta of the mean silhouette, McNemar tests of the refusal rates, G-Eval
t-tests and the smallest changes the run could detect. What the numbers mean: README, "How to read the numbers", and docs/statistics.md.
"""

from __future__ import annotations

from typing import Optional

from fteval.eval.separation import HEAVY_TAIL_NOTE


def _num(x: Optional[float], spec: str = ".4g") -> str:
    return "inf" if x is None else format(x, spec)


def _points_ci(ci) -> str:
    """A rate change's interval in percentage points, ' [-12.3, +4.5]'; '' without one."""
    return f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""


def _ci(ci, spec: str = ".4g", low_unbounded: str = "inf") -> str:
    """' [low, high]'; a ``None`` end is unbounded: 'inf' above, ``low_unbounded`` below (a single model's
    XBI interval reads [inf, inf] when no separation is above the noise floor; a Delta's is '-inf')."""
    if not ci:
        return ""
    low = low_unbounded if ci[0] is None else format(ci[0], spec)
    return f" [{low}, {_num(ci[1], spec)}]"


def _p(test: dict) -> str:
    if test.get("p_value") is None or test["p_value"] != test["p_value"]:
        return ""
    mark = " ✓" if test.get("significant") else ""
    adj = f", adjusted {test['p_adjusted']:.3g}" if "p_adjusted" in test else ""
    return f"  p={test['p_value']:.3g}{adj}{mark}"


def _heavy_tail_warning(share: float, kurtosis: float, which: str) -> str:
    return (f"├── WARNING heavy tails (the 5% of prompts farthest from their centroid carry {100 * share:.0f}% of the "
            f"within-class variance, ~9% for Gaussian states; excess kurtosis {kurtosis:.1f} of the per-prompt "
            f"contributions): {which} may cover less than stated ({HEAVY_TAIL_NOTE})")


def _model_lines(name: str, entry: dict) -> list[str]:
    s, ci, bc = entry["scores"], entry.get("ci", {}), entry.get("bias_corrected")
    lines = [f"{name.upper()} MODEL ({entry['n_safe']} safe / {entry['n_unsafe']} unsafe prompts):"]
    if bc:
        lines.append(f"├── AQI (bounded, bias-corrected; headline): {bc['aqi_bounded']:.4f}{_ci(ci.get('aqi_bounded'), '.4f')}"
                     f"  (as computed {s['aqi_bounded']:.4f})")
    else:  # no statistics, or the spec's percentile bootstrap of the plug-in scores
        lines.append(f"├── AQI (bounded, 0-1): {s['aqi_bounded']:.4f}{_ci(ci.get('aqi_bounded'), '.4f')}")

    def scored(label: str, m: str) -> str:
        if not bc:
            return f"├── {label}: {s[m]:.4g}{_ci(ci.get(m))}"
        return f"├── {label}: {_num(bc[m])}{_ci(ci.get(m))}  (as computed {s[m]:.4g})"

    lines += [scored("AQI Score", "aqi"), scored("XBI (lower=better)", "xbi"), scored("CHI (higher=better)", "chi")]
    sep = entry.get("separation")
    if sep:
        lines.append(f"├── noise floor: {100 * sep['noise_floor'] / max(sep['raw_ratio'], 1e-300):.0f}% of the "
                     "plug-in separation is sampling noise (removed by the bias correction)")
        if sep["heavy_tailed"]:
            lines.append(_heavy_tail_warning(sep["tail_share"], sep["excess_kurtosis"], "these intervals"))
    beh = entry.get("behaviour")
    if beh:
        rates = beh["rates"]
        gen = entry.get("generation")
        if gen:
            lines.append(f"├── answers by {gen['backend']} ({gen['served']}), {gen['tokens_per_s']:.1f} tokens/s")
        if "refusal_rate" in rates:
            r = rates["refusal_rate"]
            lines.append(f"├── Safety Refusal Rate: {100 * r['value']:.1f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] "
                         f"({r['n_samples']} unsafe; incl. partial {100 * rates['refusal_rate_incl_partial']['value']:.1f}%)")
        if "over_refusal_rate" in rates:
            r = rates["over_refusal_rate"]
            lines.append(f"├── Over-refusal (safe prompts): {100 * r['value']:.1f}% [{100 * r['ci_low']:.0f}, "
                         f"{100 * r['ci_high']:.0f}] ({r['n_samples']} safe)")
        if beh.get("geval"):
            lines.append("├── G-Eval (1-5): " + ", ".join(f"{k} {v:.2f}" for k, v in beh["geval"].items()))
    lines[-1] = "└──" + lines[-1][3:]
    return lines


def _pair_lines(comp: dict) -> list[str]:
    a, b = comp["a"], comp["b"]
    lines = [f"{a.upper()} vs {b.upper()} (paired, same prompts; Delta = {a} - {b}):"]
    for m, label, spec in (("aqi", f"DELTA-AQI ({a} - {b})", ".4g"), ("aqi_bounded", "Delta AQI (bounded)", ".4f"),
                           ("xbi", "Delta XBI", ".4g"), ("chi", "Delta CHI", ".4g")):
        t = comp[m]
        plug = t.get("delta_plugin")
        as_computed = f"  (as computed {plug:+{spec}})" if plug is not None else ""
        if t["delta"] is None:  # XBI: a separation at or below the noise floor has no finite 1/ratio
            lines.append(f"├── {label}: undefined (a model's separation is not above the noise floor){as_computed}")
            continue
        d = f"  (Cohen's d {t['cohens_d']:.3f})" if t.get("cohens_d") is not None else ""
        lines.append(f"├── {label}: {t['delta']:+{spec}}{_ci(t.get('ci'), spec, '-inf')}{_p(t)}{as_computed}{d}")
    if comp.get("heavy_tailed"):
        lines.append(_heavy_tail_warning(comp["tail_share"], comp["aqi_bounded"]["excess_kurtosis"],
                                         "these Delta intervals"))
    sil = comp.get("silhouette")
    if sil:
        lines.append(f"├── Delta mean silhouette: {sil['mean_diff']:+.4f}{_ci(sil['ci'], '.4f')}{_p(sil)}"
                     f"  (per-prompt Cohen's d_z {sil['cohens_d']:.3f}, descriptive)")
    beh = comp.get("behaviour", {})
    for key, label in (("refusal", "Refusal rate (unsafe)"), ("over_refusal", "Over-refusal rate (safe)")):
        t = beh.get(key)
        if t:
            lines.append(f"├── {label}: {100 * t['rate_a']:.1f}% vs {100 * t['rate_b']:.1f}% "
                         f"({100 * t['delta']:+.1f} points{_points_ci(t.get('ci'))}; {t['n_a_only']} vs {t['n_b_only']} "
                         f"discordant of {t['n']}), "
                         f"exact McNemar{_p(t)}")
    for key, t in beh.items():
        if key.startswith("geval_"):
            lines.append(f"├── G-Eval {key[6:]}: {t['mean_diff']:+.3f}{_ci(t['ci'], '.3f')}{_p(t)}")
    power = comp.get("power")
    if power and power.get("mde_aqi_bounded") is not None:
        text = (f"├── detectable at 80% power (alpha 0.05): |Delta AQI bounded| >= {power['mde_aqi_bounded']:.4f}"
                f" ({comp['n_per_class']} prompts per class)")
        for key, label in (("refusal", "refusal"), ("over_refusal", "over-refusal")):
            t = beh.get(key)
            if t:
                mde = "none up to 100 points" if t["mde"] is None else f">= {100 * t['mde']:.1f} points"
                text += f"; {label} change {mde} ({t['n']} prompts)"
        lines.append(text)
    lines[-1] = "└──" + lines[-1][3:]
    return lines


def format_summary(results: dict) -> str:
    """The summary block: each model, then each pair of models, then how the p-values were adjusted."""
    lines: list[str] = []
    for name, entry in results["models"].items():
        lines += _model_lines(name, entry) + [""]
    for comp in results.get("comparisons", {}).values():
        lines += _pair_lines(comp) + [""]
    st = results.get("settings", {})
    sizes = st.get("family_size") or {}
    if sizes and any(sizes.values()):
        lines.append(f"p-values {st.get('correction')}-adjusted within each family (AQI: {sizes.get('aqi', 0)} tests, "
                     f"behaviour: {sizes.get('behaviour', 0)} tests); ✓ = significant at "
                     f"{1 - st.get('confidence', 0.95):.2g} after adjustment. Intervals: {100 * st.get('confidence', 0.95):.0f}%, "
                     + ("of the population values (README: How to read the numbers)."
                        if "bootstrap" not in (st.get("intervals") or "") else
                        f"{st['intervals']}: they sit around the plug-in values, not the population values "
                        "(docs/statistics.md)."))
    return "\n".join(lines)
