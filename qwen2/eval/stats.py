"""How sure a score is, and whether two runs differ: 95% intervals and paired tests.

- `wilson`: the Wilson score interval of an accuracy (right near 0% and 100%, where the normal
  approximation leaves [0, 1]).
- `share`: a count as a summary reports it, in percent with its Wilson interval.
- `bootstrap_ci`: a percentile bootstrap over items, for means that are not counts (pass@k).
- `block_bootstrap_ci`: the same over contiguous blocks of a sequence (a text's per-token losses),
  where neighbouring values are not independent; it says how much the mean moves across this
  text's stretches, not across other texts.
- `compare`: two runs of one eval on their shared items. Correct/incorrect items take the exact
  McNemar test (a two-sided binomial test on the items where the runs disagree); scores in
  [0, 1] (pass@k with several samples) take a paired bootstrap. The difference (B - A) comes with a
  paired-bootstrap 95% interval either way. `breakdown` repeats `compare` within each language and
  category the records name (`GROUPS`); its p-values are per group, not corrected for the number
  of groups.
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


def share(hits: int, total: int) -> dict:
    """hits / total in percent with its Wilson 95% interval (None for both when there is nothing)."""
    if total == 0:
        return dict(percent=None, ci95=None)
    return dict(percent=round(100 * hits / total, 2), ci95=percent_ci(*wilson(hits, total)))


def bootstrap_ci(values: list[float], rounds: int = ROUNDS, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of `values`, resampling items."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return 0.0, 0.0
    means = x[np.random.default_rng(seed).integers(0, len(x), (rounds, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def block_bootstrap_ci(values: list[float], block: int, rounds: int = ROUNDS,
                       seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of `values`, resampling contiguous blocks of `block` values (the
    last may be shorter: each resample's mean is its values' sum over their count)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return 0.0, 0.0
    starts = np.arange(0, len(x), block)
    sums, counts = np.add.reduceat(x, starts), np.diff(np.append(starts, len(x)))
    picks = np.random.default_rng(seed).integers(0, len(starts), (rounds, len(starts)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
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


# the verdict a record carries: accuracy evals, humaneval, safety (a harmful reply), multilingual's probe
SCORES = ("correct", "passed", "harmful", "in_asked")
# a breakdown's name and the record fields that place an item in it (a text, or a list of them)
GROUPS = {"language": ("lang", "language"), "category": ("categories",)}


def _key(record: dict) -> str:
    return str(record.get("task_id", record["id"]))  # HumanEval's records are samples of a task


def item_scores(records: list[dict]) -> dict[str, float]:
    """Each item's score in [0, 1]: its verdict (the first of `SCORES` it has), averaged over an
    item's samples."""
    grouped: dict[str, list[float]] = {}
    for r in records:
        value = next((r[field] for field in SCORES if field in r), None)
        if isinstance(value, bool):
            grouped.setdefault(_key(r), []).append(float(value))
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


def breakdown(a: list[dict], b: list[dict]) -> dict[str, dict[str, dict]]:
    """`compare` within each group of each breakdown in `GROUPS` that run A's records name, e.g.
    {"language": {"eng": {...}, "zho": {...}}}; items are placed by run A's record."""
    out: dict[str, dict[str, dict]] = {}
    for name, fields in GROUPS.items():
        members: dict[str, set[str]] = {}
        for r in a:
            value = next((r[f] for f in fields if f in r), None)
            for group in [value] if isinstance(value, str) else value or []:
                members.setdefault(group, set()).add(_key(r))
        groups = {}
        for group in sorted(members):
            try:
                groups[group] = compare([r for r in a if _key(r) in members[group]],
                                        [r for r in b if _key(r) in members[group]])
            except ValueError:  # B scored none of this group's items
                continue
        if groups:
            out[name] = groups
    return out
