"""How sure a score is, and whether two runs differ: 95% intervals and paired tests.

- `wilson`: the Wilson score interval of an accuracy (right near 0% and 100%, where the normal
  approximation leaves [0, 1]).
- `bootstrap_ci`: a percentile bootstrap over items, for means that are not counts (pass@k).
- `compare`: two runs of one eval on their shared items. Correct/incorrect items take the exact
  McNemar test (a two-sided binomial test on the items where the runs disagree); scores in
  [0, 1] (pass@k with several samples) take a paired bootstrap. The difference (B - A) comes with a
  paired-bootstrap 95% interval either way.
Bootstraps draw from a seeded generator, so a report is reproducible.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
ROUNDS = 10_000


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson interval of correct / total, as fractions."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: list[float], rounds: int = ROUNDS, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of `values`, resampling items."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return 0.0, 0.0
    means = x[np.random.default_rng(seed).integers(0, len(x), (rounds, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def percent_ci(low: float, high: float) -> list[float]:
    return [round(100 * low, 2), round(100 * high, 2)]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (items only A got right, only B)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], rounds: int = ROUNDS, seed: int = 0) -> dict:
    """B - A on paired items: the mean difference, its 95% interval and a two-sided p-value (how
    often the resampled difference falls on the other side of zero, doubled)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (rounds, len(diff)))].mean(axis=1)
    p = 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return {"difference": float(diff.mean()), "ci95": (float(np.percentile(means, 2.5)),
                                                       float(np.percentile(means, 97.5))), "p": min(1.0, p)}


def item_scores(records: list[dict]) -> dict[str, float]:
    """Each item's score in [0, 1]: its `correct` or `passed`, averaged over an item's samples
    (HumanEval's records are samples of a `task_id`)."""
    grouped: dict[str, list[float]] = {}
    for r in records:
        value = r.get("correct", r.get("passed"))
        if isinstance(value, bool):
            grouped.setdefault(str(r.get("task_id", r["id"])), []).append(float(value))
    return {key: sum(v) / len(v) for key, v in grouped.items()}


def compare(a: list[dict], b: list[dict]) -> dict:
    """Run B against run A on the items both scored: scores in percent, the difference with its
    interval and p-value, and the test used."""
    scores_a, scores_b = item_scores(a), item_scores(b)
    shared = sorted(scores_a.keys() & scores_b.keys())
    if not shared:
        raise ValueError("the two runs share no scored items (same eval? records with `correct` or `passed`?)")
    xa, xb = [scores_a[k] for k in shared], [scores_b[k] for k in shared]
    paired = paired_bootstrap(xa, xb)
    out = {"items": len(shared), "a": round(100 * float(np.mean(xa)), 2), "b": round(100 * float(np.mean(xb)), 2),
           "difference": round(100 * paired["difference"], 2), "ci95": percent_ci(*paired["ci95"])}
    if all(x in (0.0, 1.0) for x in xa + xb):
        only_a = sum(x > y for x, y in zip(xa, xb))
        only_b = sum(y > x for x, y in zip(xa, xb))
        return out | {"test": "exact McNemar", "only_a": only_a, "only_b": only_b, "p": mcnemar_exact(only_a, only_b)}
    return out | {"test": "paired bootstrap", "p": paired["p"]}
