"""A cosine threshold that adapts to the corpus: ``embedding.threshold: auto``.

A fixed threshold does not transfer between corpora. On full-size photos unrelated pairs of a
copy-detection descriptor (SSCD) sit near 0 and 0.60 is safe; on 32-px photos unrelated pairs
reach 0.60–0.65 (a frog and a deer). And however rare an unrelated pair above a threshold is,
their number grows with n²: at 10⁸ samples a per-pair rate of 10⁻¹² is already 5 000 pairs.

So the threshold is chosen per run, from this corpus's own unrelated-pair similarities:

1. **Sample.** A random subset of up to ``subset`` ok samples, all its pairs (one matrix
   product; 3 000 samples give 4.5 million pairs), leaving out pairs of identical bytes and
   pairs whose pHash and dHash are both within twice their radius (copies, by the hashes).
2. **Model the tail.** ``P(S > t) = P(S > u) · exp(-λ (t - u))`` above ``u``, the sample's
   ``1 - tail`` quantile. Duplicates live at and above the embedder family's threshold
   (``floor``: SSCD 0.60), so when ``u`` is below the floor only pairs below it are used, with an
   exponential truncated at the floor (maximum likelihood): a corpus with many copies would
   otherwise look "dense". When ``u`` is at or above the floor, more than ``tail`` of all pairs
   reach it — far more than copies can make up — and the top of the whole sample is fitted.
   Below the floor the top fitted is at least ``TAIL_MIN`` (50) pairs: a few hundred samples
   (all their pairs sampled) have too few pairs for the ``tail`` share alone; under
   ``SAMPLE_MIN`` sampled pairs the family threshold is kept.
   Cosines are bounded by 1, so their true tail falls faster than an exponential: the model errs
   towards too many false pairs, i.e. a higher threshold.
3. **Budget.** The expected number of unrelated pairs above ``t`` among all ``n(n-1)/2``
   pairs of the run is ``N · P(S > t)``; the threshold is the smallest ``t ≥ floor`` that keeps
   it under ``rate · n`` (``embedding.false_pair_rate``, default 1 per 10 000 samples; at least
   1), and at most ``ceiling``. With 10 % of a corpus duplicated that is a pair precision of
   about 0.999 by the model. The model extrapolates the sample's unrelated pairs; other shots
   of one scene are too rare to show in it and sit above its tail (CIFAR-10 at a budget of 1 per
   1 000: 69 pairs of different photos, by a pixel check, where the model expected 10), which is
   why the default budget is the tighter one (docs/embedders.md, "Choosing the default").

The threshold never drops below the family's fixed value: auto only raises it where the corpus
needs it. Cost: one product of the subset (about a second on 2 cores); no all-pairs pass, so it
works at any n. Everything it estimated is returned (and written to stats.json and the report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# expected unrelated pairs allowed above the threshold, per sample: the default of
# ``embedding.false_pair_rate`` (why this value: docs/embedders.md, "Choosing the default")
FALSE_PAIR_RATE = 1e-4


@dataclass(frozen=True)
class ThresholdChoice:
    value: float  # the threshold used
    mode: str  # "auto" or "fixed"
    floor: float  # the embedder family's threshold (auto never goes below it)
    n: int  # ok samples with an embedding
    budget: float  # expected false pairs allowed at n
    expected_false_pairs: float | None  # at ``value``, over all pairs at n (the model's estimate)
    expected_false_pairs_at_floor: float | None
    sampled_pairs: int = 0
    tail_start: float | None = None  # u
    tail_share: float | None = None  # P(S > u), unrelated pairs
    tail_rate: float | None = None  # λ
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def fixed(value: float, n: int) -> ThresholdChoice:
    return ThresholdChoice(value=float(value), mode="fixed", floor=float(value), n=n, budget=float("nan"),
                           expected_false_pairs=None, expected_false_pairs_at_floor=None)


def _truncated_rate(excess: np.ndarray, width: float) -> float:
    """MLE of λ for an exponential truncated to [0, width): its mean is 1/λ - width/(e^{λ width} - 1)."""
    mean = float(excess.mean())
    if mean <= 0:
        return 1e6
    if mean >= width / 2:  # flat (or rising) density up to the floor: the heaviest tail we allow
        return 1e-6

    def m(lam: float) -> float:
        return 1.0 / lam - width / math.expm1(min(lam * width, 700.0))

    lo, hi = 1e-6, 1e6
    for _ in range(200):  # m is decreasing in λ
        mid = math.sqrt(lo * hi)
        if m(mid) > mean:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


# The tail below the floor is fitted on its top ``tail`` share, and on at least TAIL_MIN pairs; with
# fewer than SAMPLE_MIN sampled pairs (n < ~140) there is no tail to speak of: the family threshold.
TAIL_MIN = 50
SAMPLE_MIN = 10_000
# An unrelated tail thins out by at least e per 0.1 of cosine above the floor; a flatter
# "tail" is copies (their similarities spread up to 1), not unrelated pairs.
LAMBDA_MIN = 10.0
# The unrelated pairs of a dense corpus pile up at the floor and thin out by e per 0.05 or faster
# (CIFAR-10 photos with SSCD: λ ≈ 46); a fitted component flatter than this is copies.
STEEP = 20.0


def _mixture_fit(x: np.ndarray, width: float) -> tuple[float, float]:
    """MLE of ``(w, λ)`` for values ``x`` in [0, width): a share ``w`` from an exponential
    truncated to [0, width) (unrelated pairs, thinning out above the floor) and ``1 - w``
    spread evenly (copies, found anywhere up to identity)."""
    from scipy.optimize import minimize

    def nll(p: np.ndarray) -> float:
        w = 1.0 / (1.0 + math.exp(-p[0]))
        lam = LAMBDA_MIN + math.exp(p[1])
        expo = lam * np.exp(-lam * x) / -math.expm1(-lam * width)
        return -float(np.log(w * expo + (1.0 - w) / width + 1e-300).sum())

    best = None
    for w0, l0 in ((0.5, 20.0), (0.9, 50.0), (0.1, 12.0)):
        r = minimize(nll, np.array([math.log(w0 / (1 - w0)), math.log(l0 - LAMBDA_MIN + 1e-3)]), method="Nelder-Mead",
                     options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
        if best is None or r.fun < best.fun:
            best = r
    assert best is not None
    return 1.0 / (1.0 + math.exp(-best.x[0])), LAMBDA_MIN + math.exp(best.x[1])


def unrelated_sample(emb: np.ndarray, valid: np.ndarray, sha: Sequence | Callable[[np.ndarray], list] | None, subset: int, seed: int,
                     copies=None) -> np.ndarray:
    """Cosines of all pairs of a random subset of the valid rows, leaving out pairs of identical
    bytes and pairs that ``copies(i, j) -> bool array`` calls copies (e.g. both hashes close)."""
    idx = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    if len(idx) > subset:
        idx = np.sort(rng.choice(idx, subset, replace=False))
    x = np.asarray(emb[idx], np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    g = x @ x.T
    iu = np.triu_indices(len(idx), 1)
    sims = g[iu]
    if sha is not None:
        # the subset's digests: a function of its rows (the run's table, taken) or a row-aligned list
        values: list = sha(idx) if callable(sha) else [sha[int(k)] for k in idx]
        h = np.empty(len(values), dtype=object)
        h[:] = values
        same = np.array([a is not None and a == b for a, b in zip(h[iu[0]], h[iu[1]])], bool)
    else:
        same = np.zeros(len(sims), bool)
    if copies is not None:
        same |= np.asarray(copies(idx[iu[0]], idx[iu[1]]), bool)
    return sims[~same]


def choose(
    emb: np.ndarray, valid: np.ndarray, floor: float, *, rate: float = FALSE_PAIR_RATE,
    sha: Sequence | Callable[[np.ndarray], list] | None = None,
    ceiling: float = 0.98, subset: int = 3000, tail: float = 1e-4, min_events: int = 30, seed: int = 0,
    copies=None, n_total: int | None = None,
) -> ThresholdChoice:
    """The auto threshold for the valid rows of ``emb`` (see the module docstring).
    ``n_total``: the corpus size to budget for, when ``emb`` is a sample of it (``calibrate``)."""
    valid = np.asarray(valid, bool)
    n = int(n_total) if n_total else int(valid.sum())
    total = n * (n - 1) / 2.0
    budget = max(rate * n, 1.0)  # at least one expected false pair: below that, noise decides
    if n < 3:
        return ThresholdChoice(floor, "auto", floor, n, budget, 0.0, 0.0, note="too few samples: the family threshold")
    sims = np.sort(unrelated_sample(emb, valid, sha, subset, seed, copies))
    m = len(sims)
    width = 1.0 - floor
    above = sims[sims >= floor] - floor
    w, lam = _mixture_fit(above, width) if len(above) >= min_events else (0.0, LAMBDA_MIN)
    copy_heavy = len(above) >= max(min_events, tail * m) and not (lam >= STEEP and w * len(above) >= min_events)
    if copy_heavy:
        # many pairs above the floor, but they do not thin out from it as unrelated pairs do:
        # copies, spread up to 1. They crowd the top of the tail below the floor too, so there
        # is nothing to extrapolate from: the family threshold.
        return ThresholdChoice(floor, "auto", floor, n, budget, None, None, sampled_pairs=m, tail_share=len(above) / m,
                               note="the pairs above the family threshold are copies, not a tail of unrelated pairs: "
                                    "the family threshold")
    if w * len(above) >= min_events:
        # measured above the floor: unrelated pairs thin out from it, copies spread up to 1
        share = len(above) / m * w  # of all pairs: unrelated and above the floor
        u, how = floor, "unrelated pairs above the family threshold measured in the sample"

        def expected(t: float) -> float:
            return total * share * (math.exp(-lam * (t - floor)) - math.exp(-lam * width)) / -math.expm1(-lam * width)
    else:
        # extrapolated from below the floor: the top of the tail, truncated at the floor
        below = sims[sims < floor]
        # the top ``tail`` of the pairs below the floor, and at least TAIL_MIN of them: under ~500 000
        # sampled pairs (n < ~1 000, where the sample is every pair) ``tail`` is a handful of pairs
        k = max(int(len(below) * tail), TAIL_MIN)
        if len(below) < SAMPLE_MIN:
            return ThresholdChoice(floor, "auto", floor, n, budget, None, None, sampled_pairs=m,
                                   note="too few sampled pairs to model the tail: the family threshold")
        u = float(below[-k - 1])
        lam = _truncated_rate(below[-k:] - u, floor - u)
        share = (k / m) / max(-math.expm1(-lam * (floor - u)), 1e-12)  # unrelated pairs above u
        how = "extrapolated from the tail below the family threshold"

        def expected(t: float) -> float:
            return total * share * math.exp(-lam * (t - u))

    if expected(floor) <= budget:
        value, note = floor, f"the family threshold keeps the expected false pairs under the budget ({how})"
    elif expected(ceiling) > budget:
        value, note = ceiling, f"capped at the ceiling: the budget would need a still higher threshold ({how})"
    else:
        lo, hi = floor, ceiling
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid) > budget else (lo, mid)
        value, note = hi, f"raised above the family threshold: this corpus's unrelated pairs reach it ({how})"
    return ThresholdChoice(
        value=round(value, 4), mode="auto", floor=floor, n=n, budget=budget, expected_false_pairs=expected(value),
        expected_false_pairs_at_floor=expected(floor), sampled_pairs=int(m), tail_start=u, tail_share=share,
        tail_rate=lam, note=note,
    )




def recorded(run, cfg) -> float:
    """The cosine threshold a finished run used (its stats.json), so that ``check``, ``eval``
    and incremental runs against it decide as the run did; the configured value if the run
    recorded none (runs before ``auto``)."""
    try:
        value = run.read_json(run.stats).get("thresholds", {}).get("embedding_cosine")
    except (OSError, ValueError, FileNotFoundError):
        value = None
    return float(value) if value is not None else cfg.embedding.resolved_threshold()


# Fallback for region matches when the run recorded no tail model (fixed threshold, or too few
# samples to fit one): the run's threshold plus this margin. Measured with sscd-distilled on
# real photos (benchmarks/check_quality.py, docs/quality.md "check"): the best region of an
# unrelated query reached 0.42 (0.45 when refined; the run's 0.60 minus 0.18) over ~64 regions ×
# 16 samples per query; the best region of a copy has median 0.84; the 3 of
# 288 copies missed at 0.65 scored 0.53-0.63. The margin is kept: it is the only guard when a
# run has no tail model, and those 3 are one tall photo cropped to a third of its height.
# Runs that recorded a tail model use it.
REGION_MARGIN = 0.05


def region_threshold(choice: dict | None, base: float, *, regions_per_query: float, n_ref: int,
                     budget: float = 0.01, margin: float = REGION_MARGIN, ceiling: float = 0.98) -> dict:
    """The cosine threshold for a query's region matches in ``dedup check``.

    Each query is compared region by region (``regions_per_query``) with every one of the
    ``n_ref`` training samples, so a query has ``R · n`` chances of a false flag, not ``n``.
    With the run's tail model (``choice``: its stats.json ``embedding_threshold``, with
    ``tail_start`` u, ``tail_share`` p and ``tail_rate`` λ), the expected false flags per query
    are ``R · n · p · exp(-λ (t - u))``; the threshold is the smallest ``t`` ≥ ``base`` (the
    run's own threshold) that keeps them under ``budget`` (0.01: one false flag per 100
    queries), at most ``ceiling``. Without a tail model: ``base + margin``.

    Returns ``{"value", "method" ("tail" | "margin"), "base", "budget_per_query",
    "expected_false_flags_per_query" (None without a model), "regions_per_query", "n_ref"}``.
    The tail is fitted on whole-image pairs; regions are smaller and blurrier, so treat the
    estimate as a guide, not a guarantee (the margin path was measured on regions).
    """
    out: dict[str, float | str | None] = {"base": float(base), "budget_per_query": float(budget), "regions_per_query": float(regions_per_query),
           "n_ref": int(n_ref), "expected_false_flags_per_query": None}
    c = choice or {}
    u, p, lam = c.get("tail_start"), c.get("tail_share"), c.get("tail_rate")
    pairs = max(float(regions_per_query), 1.0) * max(int(n_ref), 1)
    if u is not None and p and lam and lam > 0 and p > 0:
        u, p, lam = float(u), float(p), float(lam)

        def expected(t: float) -> float:
            return pairs * p * math.exp(-lam * (t - u))

        t = u + math.log(max(pairs * p / budget, 1e-300)) / lam
        t = min(max(t, float(base)), ceiling)
        out.update(value=round(t, 4), method="tail", expected_false_flags_per_query=expected(t))
        return out
    out.update(value=round(min(float(base) + float(margin), ceiling), 4), method="margin", margin=float(margin))
    return out
