"""The report: rooflines, the row each peer is judged by, and the printed table and ratios."""

from __future__ import annotations

from typing import Any

from qwen2.bench.peers import PEERS

METRICS = ("load_s", "prefill_tps", "decode_tps", "decode_tps_c4", "decode_tps_c16", "peak_rss_mb")


def roofline(result: dict[str, Any], bandwidth_gbs: float, context: float) -> dict[str, Any]:
    """Batch-1 decode ceiling: bytes read per token (weights + KV at the mean decode length) / bandwidth."""
    if "weight_bytes" not in result or result.get("decode_tps") is None:
        return {}
    per_token = result["weight_bytes"] + result["kv_bytes_per_pos"] * context
    ceiling = bandwidth_gbs * 1e9 / per_token
    return {"bytes_per_token": int(per_token), "roofline_tps": round(ceiling, 2),
            "achieved_gbs": round(result["decode_tps"] * per_token / 1e9, 2),
            "roofline_frac": round(result["decode_tps"] / ceiling, 3)}


def pick(peer: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The row a peer is judged by: ours as `load()` gives it (auto), a peer's faster decode."""
    measured = {k: r for k, r in rows.items() if "missing" not in r}
    if not measured:
        return dict.fromkeys(METRICS) | {"missing": "; ".join(f"{k}: {r['missing']}" for k, r in rows.items())}
    if peer == "qwen2":
        key = next(iter(rows))
        if "missing" in rows[key]:
            return dict.fromkeys(METRICS) | rows[key]
    else:
        key = max(measured, key=lambda k: measured[k]["decode_tps"])
    chosen = dict.fromkeys(METRICS) | rows[key] | {"variant": key}
    others = {k: r for k, r in rows.items() if k != key}
    return chosen | ({"variants": others} if others else {})


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_report(machine: dict[str, Any], rows: dict[str, dict[str, dict]], results: dict[str, dict]) -> None:
    """Every row as a table, a warning when other processes were busy, then ours / each peer."""
    m = machine
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads for every engine; "
          f"memory read bandwidth {m['bandwidth_gbs']:.1f} GB/s ({m['bandwidth_method']})")
    print(f"software: torch {m['torch']}, llama-cpp-python {m['llama_cpp_python']} "
          f"({m.get('llama_cpp_build', 'not run')}), transformers {m['transformers']}; native bf16: {m['native_bf16']}")
    print(f"model: {m['model']}")
    print(f"workload: prefill {m['prompt_tokens']} tokens of {m['prompt_source']}; decode {m['new_tokens']} greedy "
          f"tokens at batch 1 (median of {m['runs']}); c4/c16: {m['concurrent_new_tokens']} tokens each for "
          f"prompts of {m['short_prompt_tokens']} tokens, all tokens / wall time incl. prefill")
    print(f"roofline: bandwidth / (weights read per token + KV at {m['roofline_context']:.0f} positions);"
          " GB/s: decode tok/s x those bytes; other: cores other processes used during the row\n")
    print(f"{'':<34}{'':>7}{'tok/s':>9}{'tok/s':>8}{'tok/s':>8}{'tok/s':>8}{'':>8}{'tok/s':>7}{'':>13}{'cores':>6}")
    head = (f"{'engine':<34}{'load s':>7}{'prefill':>9}{'decode':>8}{'c4':>8}{'c16':>8}{'RSS MB':>8}"
            f"{'roof':>7}{'% roof':>7}{'GB/s':>6}{'other':>6}  format")
    print(head + "\n" + "-" * len(head))
    for variants in rows.values():
        for name, r in variants.items():
            if "missing" in r:
                print(f"{name:<34}missing: {r['missing']}")
                continue
            roof = r.get("roofline") or {}
            print(f"{name:<34}{fmt(r['load_s'], 2):>7}{fmt(r['prefill_tps']):>9}{fmt(r['decode_tps']):>8}"
                  f"{fmt(r.get('decode_tps_c4')):>8}{fmt(r.get('decode_tps_c16')):>8}{fmt(r['peak_rss_mb'], 0):>8}"
                  f"{fmt(roof.get('roofline_tps')):>7}{fmt(100 * roof['roofline_frac'] if roof else None, 0):>7}"
                  f"{fmt(roof.get('achieved_gbs')):>6}{fmt(r.get('other_cpu_cores'), 2):>6}  {r.get('format', '')}")
    busiest = max((r.get("other_cpu_cores") or 0 for v in rows.values() for r in v.values()), default=0)
    if busiest > 0.2:
        print(f"WARNING: other processes kept up to {busiest:.2f} cores busy during a run (column 'other'); "
              "engines that ran at different times are not comparable: rerun on a quiet machine")
    # ours / peer on every throughput metric, each against the peer's fastest variant at it (the issue's
    # "best peer"): transformers' bf16 prefills fastest while its float32 may decode a hair faster
    ours = results["qwen2"]
    print(f"\n{'qwen2 / peer (> 1: ours faster)':<34}{'prefill':>16}{'decode':>8}{'c4':>8}{'c16':>8}"
          "  (each column: the peer's fastest variant at it)")
    everyone = {}
    for peer in PEERS[1:]:
        variants = {k: r for k, r in rows.get(peer, {}).items() if "missing" not in r}
        if ours.get("missing") or not variants:
            print(f"{'vs ' + peer:<34}{'missing':>16}")
            continue
        everyone |= variants
        print(f"{'vs ' + peer:<34}" + row_of(ratios(ours, variants)))
    if len(everyone) > 1 and not ours.get("missing"):
        print(f"{'vs the best peer':<34}" + row_of(ratios(ours, everyone)))


THROUGHPUTS = METRICS[1:5]


def ratios(ours: dict[str, Any], variants: dict[str, dict[str, Any]]) -> list[float | None]:
    """ours / the fastest of `variants` at each throughput metric (None where either is unmeasured)."""
    out = []
    for k in THROUGHPUTS:
        best = max((r[k] for r in variants.values() if r.get(k)), default=None)
        out.append(ours[k] / best if ours.get(k) and best else None)
    return out


def row_of(values: list[float | None]) -> str:
    return f"{fmt(values[0], 2):>16}" + "".join(f"{fmt(x, 2):>8}" for x in values[1:])
