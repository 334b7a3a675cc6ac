#!/usr/bin/env bash
# The benchmark evals of the Qwen2 report on one model, each with its wall time, results in
# $OUT (default bench/evals/). LIMIT caps the items per eval (per language where an eval is
# per language); leave it empty for full runs. Every eval resumes from its results file, so an
# interrupted run continues where it stopped. MultiJail ships in no package: give its CSV as
# MULTIJAIL=path/to/MultiJail.csv or the safety eval is skipped.
set -euo pipefail
MODEL=${MODEL:+--model $MODEL}
LIMIT=${LIMIT:+--limit $LIMIT}
OUT=${OUT:-bench/evals}
mkdir -p "$OUT"
lscpu | grep -E "Model name|^CPU\(s\)" | sed 's/^/# /'
run() {
    local name=$1; shift
    echo "## $name"
    /usr/bin/time -f "# $name: wall %e s" qwen2 eval "$@" $MODEL $LIMIT --json "$OUT/$name.json"
}
run humaneval humaneval
run mmlu-0shot mmlu --shots 0
run mmlu-5shot mmlu --shots 5
run asdiv asdiv
run ifeval ifeval
run multilingual multilingual --png "$OUT/multilingual.png"
if [[ -n "${MULTIJAIL:-}" ]]; then
    run safety safety --data "$MULTIJAIL"
else
    echo "# safety skipped: set MULTIJAIL to the path of MultiJail.csv"
fi
