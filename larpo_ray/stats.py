"""Small-sample statistics for comparing runs over seeds (stdlib only, no scipy).

- `t_interval(values)`: mean and the two-sided 95% Student-t interval over seeds.
- `paired_bootstrap(a, b)`: the difference of two variants' accuracy on the same held-out prompts
  and seeds, with a two-stage bootstrap interval: seeds are resampled, then prompts, with the same
  draw for both variants (paired). It counts both sources of noise a study has, the run's seed and
  which prompts happen to be held out, where a t-test over three seeds sees only the first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence


def mean(values: Iterable[float], empty: float = math.nan) -> float:
    """The arithmetic mean; `empty` (NaN unless the caller says otherwise) when there are no values."""
    values = list(values)
    return sum(values) / len(values) if values else empty


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection on its
    CDF (integrated with Simpson's rule; accurate to ~1e-6 for the quantiles used here)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 4000) -> float:  # 0.5 + integral of the pdf over [0, x]
        h = x / n
        s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean; one value gives (v, nan, nan)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    m = mean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    half = t_quantile(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return m, m - half, m + half


def paired_bootstrap(
    a: dict[int, dict[str, float]],
    b: dict[int, dict[str, float]],
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Variant A minus variant B on per-prompt scores {seed: {prompt uid: score}}, over the seeds
    and prompts both have. Returns the observed difference, the percentile interval and a
    two-sided bootstrap p-value (twice the smaller tail mass at 0)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two variants share no seed")
    prompts = {s: sorted(set(a[s]) & set(b[s])) for s in seeds}
    diffs = {s: [a[s][u] - b[s][u] for u in prompts[s]] for s in seeds}
    observed = mean([mean(diffs[s]) for s in seeds])
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        picked = [rng.choice(seeds) for _ in seeds]
        per_seed = []
        for s in picked:
            d = diffs[s]
            per_seed.append(sum(d[rng.randrange(len(d))] for _ in d) / len(d))
        draws.append(mean(per_seed))
    draws.sort()
    tail = (1 - level) / 2
    low, high = draws[int(tail * n_boot)], draws[min(n_boot - 1, int((1 - tail) * n_boot))]
    below = sum(1 for d in draws if d <= 0) / n_boot
    above = sum(1 for d in draws if d >= 0) / n_boot
    return {
        "diff": observed,
        "low": low,
        "high": high,
        "p": min(1.0, 2 * min(below, above)),
        "seeds": float(len(seeds)),
        "prompts": float(mean([len(prompts[s]) for s in seeds])),
    }
