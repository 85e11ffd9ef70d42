"""Separation metrics against scikit-learn / numpy, invariances, DDP-style reduction, errors."""

import numpy as np
import pytest
import torch
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

from fteval.eval.metrics import (
    AQIScore,
    CalinskiHarabaszIndex,
    DaviesBouldinIndex,
    DunnIndex,
    XieBeniIndex,
    cluster_scores,
    layer_profile,
)

RTOL = 1e-6


def _blobs(n_per_class=(60, 40), dim=8, shift=1.5, offset=30.0, seed=0):
    """Gaussian classes with a large common offset (like LLM hidden states); labels 0..K-1."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k, n in enumerate(n_per_class):
        centre = torch.zeros(dim, dtype=torch.float64)
        centre[k % dim] = shift * (k + 1)
        xs.append(torch.randn(n, dim, generator=gen, dtype=torch.float64) * (1 + 0.3 * k) + centre + offset)
        ys.append(torch.full((n,), k))
    return torch.cat(xs), torch.cat(ys)


def _numpy_reference(x: np.ndarray, y: np.ndarray, lam: float = 0.5) -> dict:
    """Independent loop-based numpy computation of every score."""
    classes = np.unique(y)
    cents = np.array([x[y == c].mean(axis=0) for c in classes])
    w = sum(((x[y == c] - cents[i]) ** 2).sum() for i, c in enumerate(classes))
    grand = x.mean(axis=0)
    b = sum((y == c).sum() * ((cents[i] - grand) ** 2).sum() for i, c in enumerate(classes))
    d2 = min(
        ((cents[i] - cents[j]) ** 2).sum() for i in range(len(classes)) for j in range(len(classes)) if i < j
    )
    n, k = len(x), len(classes)
    xbi = w / (n * d2)
    chi = (b / (k - 1)) / (w / (n - k))
    r2 = b / ((x - grand) ** 2).sum()
    radius = max(np.linalg.norm(x[y == c] - cents[i], axis=1).max() for i, c in enumerate(classes))
    return {
        "xbi": xbi,
        "inv_xbi": 1 / xbi,
        "chi": chi,
        "r2": r2,
        "aqi": lam / xbi + (1 - lam) * chi,
        "aqi_bounded": lam / (1 + xbi) + (1 - lam) * r2,
        "dunn": np.sqrt(d2) / radius,
    }


@pytest.mark.parametrize("n_per_class", [(60, 40), (30, 25, 45)])
def test_scores_match_sklearn_and_numpy(n_per_class):
    x, y = _blobs(n_per_class)
    scores = cluster_scores(x, y)
    ref = _numpy_reference(x.numpy(), y.numpy())
    for key, value in ref.items():
        assert float(scores[key]) == pytest.approx(value, rel=RTOL), key
    assert float(scores["chi"]) == pytest.approx(calinski_harabasz_score(x.numpy(), y.numpy()), rel=RTOL)
    assert float(scores["db"]) == pytest.approx(davies_bouldin_score(x.numpy(), y.numpy()), rel=RTOL)
    assert all(v.dtype == torch.float64 for v in scores.values())


def test_metric_classes_match_sklearn():
    x, y = _blobs()
    xn, yn = x.numpy(), y.numpy()
    ref = _numpy_reference(xn, yn)
    expected = {
        XieBeniIndex: ref["xbi"],
        CalinskiHarabaszIndex: calinski_harabasz_score(xn, yn),
        DaviesBouldinIndex: davies_bouldin_score(xn, yn),
        DunnIndex: ref["dunn"],
    }
    for cls, value in expected.items():
        metric = cls()
        metric.update(x, y)
        assert float(metric.compute()) == pytest.approx(value, rel=RTOL), cls.__name__
    aqi = AQIScore()
    aqi.update(x.float(), y)  # float32 input is computed in float64
    out = aqi.compute()
    assert float(out["chi"]) == pytest.approx(calinski_harabasz_score(xn, yn), rel=1e-5)
    assert DaviesBouldinIndex.higher_is_better is False and XieBeniIndex.higher_is_better is False


def test_spec_aqi_is_rescaled_chi_for_two_clusters():
    x, y = _blobs((70, 30))
    s = cluster_scores(x, y)
    n, n1, n2 = 100, 70, 30
    assert float(s["inv_xbi"]) == pytest.approx(float(s["chi"]) * n**2 / (n1 * n2 * (n - 2)), rel=1e-10)
    lam = 0.3
    s_lam = cluster_scores(x, y, lam=lam)
    assert float(s_lam["aqi"]) == pytest.approx(lam * float(s["inv_xbi"]) + (1 - lam) * float(s["chi"]), rel=1e-12)


def test_invariances_label_swap_values_permutation_and_scale():
    x, y = _blobs((50, 35))
    base = cluster_scores(x, y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    variants = {
        "swap": (x, 1 - y),
        "values": (x, torch.where(y == 0, 7, -3)),
        "permute": (x[perm], y[perm]),
        "translate_scale": (x * 4.0 - 11.0, y),
    }
    for name, (xv, yv) in variants.items():
        got = cluster_scores(xv, yv)
        for key in ("xbi", "chi", "r2", "aqi", "aqi_bounded", "db", "dunn"):
            assert float(got[key]) == pytest.approx(float(base[key]), rel=1e-9), (name, key)


def test_update_in_parts_and_merge_equal_one_call():
    x, y = _blobs((40, 40))
    order = torch.randperm(80, generator=torch.Generator().manual_seed(1))
    x, y = x[order], y[order]
    full = AQIScore()
    full.update(x, y)
    expected = full.compute()

    two_calls = AQIScore()
    two_calls.update(x[:30], y[:30])
    two_calls(x[30:], y[30:])  # forward only accumulates
    merged_a, merged_b = AQIScore(), AQIScore()
    merged_a.update(x[:50], y[:50])
    merged_b.update(x[50:], y[50:])
    merged_a.merge_state(merged_b)
    for metric in (two_calls, merged_a):
        got = metric.compute()
        for key, value in expected.items():
            assert float(got[key]) == pytest.approx(float(value), rel=1e-12), key


@pytest.mark.parametrize("cls", [AQIScore, XieBeniIndex, CalinskiHarabaszIndex, DaviesBouldinIndex, DunnIndex])
def test_ddp_sync_concatenates_ranks(cls):
    """Simulate a 2-rank all_gather: each rank holds half; after sync both see the union."""
    x, y = _blobs((30, 30))
    other = {}

    def fake_gather(tensor, group=None):  # what torch.distributed all_gather returns on rank 0
        return [tensor, other[tensor.dtype]]

    rank0 = cls(dist_sync_fn=fake_gather, distributed_available_fn=lambda: True)
    rank1 = cls()
    rank0.update(x[:20], y[:20])  # rank 0 alone holds only class 0
    rank1.update(x[20:], y[20:])
    emb_name = "embeddings" if hasattr(rank1, "embeddings") else "data"  # torchmetrics' own classes: data
    other.update({torch.float64: torch.cat(getattr(rank1, emb_name)), torch.int64: torch.cat(rank1.labels)})
    single = cls()
    single.update(x, y)
    got, want = rank0.compute(), single.compute()
    if isinstance(want, dict):
        got, want = got["aqi"], want["aqi"]
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_aqi_bounded_is_bounded():
    gen = torch.Generator().manual_seed(0)
    cases = [
        _blobs((20, 20), shift=0.0),  # no separation
        _blobs((20, 20), shift=50.0),  # huge separation
        (torch.randn(30, 5, generator=gen, dtype=torch.float64), torch.arange(30) % 2),
    ]
    for x, y in cases:
        value = float(cluster_scores(x, y)["aqi_bounded"])
        assert 0.0 <= value <= 1.0
    far = float(cluster_scores(*_blobs((20, 20), shift=1e4))["aqi_bounded"])
    assert far > 0.99


def test_aqi_bounded_does_not_drift_with_n_but_chi_does():
    def mean_scores(n, reps=20):
        acc = {"aqi_bounded": 0.0, "chi": 0.0, "aqi": 0.0}
        for rep in range(reps):
            x, y = _blobs((n // 2, n // 2), dim=4, shift=1.0, seed=100 + rep)
            s = cluster_scores(x, y, with_db_dunn=False)
            for key in acc:
                acc[key] += float(s[key]) / reps
        return acc

    small, large = mean_scores(200), mean_scores(2000)
    assert abs(small["aqi_bounded"] - large["aqi_bounded"]) < 0.02
    assert large["chi"] / small["chi"] > 7.0  # grows ~linearly with N (10x here)
    assert large["aqi"] / small["aqi"] > 4.0


def test_layer_profile_matches_per_layer_scores():
    gen = torch.Generator().manual_seed(0)
    reps = torch.randn(40, 3, 6, generator=gen)
    y = torch.arange(40) % 2
    reps[y == 1, 2] += 2.0  # only the last layer separates
    profile = layer_profile(reps, y)
    assert profile["chi"].shape == (3,)
    for layer in range(3):
        assert float(profile["xbi"][layer]) == pytest.approx(float(cluster_scores(reps[:, layer], y)["xbi"]), rel=1e-12)
    assert int(profile["chi"].argmax()) == 2


def test_layer_profile_marks_a_layer_without_spread_as_nan():
    gen = torch.Generator().manual_seed(0)
    reps = torch.randn(20, 3, 4, generator=gen)
    reps[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # the same vector for every prompt (template tokens at layer 0)
    y = torch.arange(20) % 2
    profile = layer_profile(reps, y)
    assert torch.isnan(profile["chi"][0]) and torch.isnan(profile["aqi_bounded"][0])
    assert float(profile["chi"][1]) == pytest.approx(float(cluster_scores(reps[:, 1], y)["chi"]), rel=1e-12)
    reps[:, 1:] = reps[:, :1]
    with pytest.raises(ValueError, match="every layer"):
        layer_profile(reps, y)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), "only class"),
        (torch.randn(10, 3), torch.tensor([0] * 9 + [1]), "class 1 has 1"),
        (torch.randn(10, 3), torch.arange(9) % 2, "10 rows but labels has 9"),
        (torch.randn(10), torch.arange(10) % 2, r"\[N prompts, D hidden\]"),
        (torch.randn(10, 3), (torch.arange(10) % 2).float(), "labels.long"),
        (torch.ones(10, 3), torch.arange(10) % 2, "identical"),
    ],
)
def test_bad_input_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        cluster_scores(x, y)
    metric = AQIScore()
    with pytest.raises(ValueError, match=match):
        metric.update(x, y)
        metric.compute()


def test_nan_embeddings_rejected_at_update():
    x, y = _blobs((5, 5))
    x[3, 1] = float("nan")
    for cls in (AQIScore, CalinskiHarabaszIndex):
        with pytest.raises(ValueError, match=r"NaN or inf in 1 of 10 prompts \(first rows: \[3\]\)"):
            cls().update(x, y)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_and_bad_lambda():
    with pytest.raises(ValueError, match="before any update"):
        XieBeniIndex().compute()
    with pytest.raises(ValueError, match="before any update"):
        DaviesBouldinIndex().compute()
    with pytest.raises(ValueError, match="lam must be in"):
        AQIScore(lam=1.5)
