#!/usr/bin/env bash
# 1. agora's training step against the same Llama in PyTorch eager (bench/pytorch_llama.py), same machine,
#    same thread count, same run; 2. the DiLoCo sweep (`agora bench diloco`: DiLoCo with k workers and H
#    inner steps against data-parallel training at an equal token budget, on tinyshakespeare); 3. the codec
#    comparison (`agora bench compression`: every pseudo-gradient codec, k = 4, equal tokens); 4. the
#    coordinator's aggregation (`agora bench aggregate`: decode + accumulate throughput and peak memory at
#    4 and 64 submitters). Prints the Markdown tables and appends them to BENCHMARKS.md.
#
#   bench/run.sh            full run: 3 alternating rounds per step-time configuration (a few minutes),
#                           then the full DiLoCo sweep (~25 minutes on 2 idle cores), the codec
#                           comparison (~25 minutes) and the aggregation benchmark (~2 minutes)
#   bench/run.sh --quick    smoke run: 1 round, few steps, `agora bench diloco --quick`; prints the
#                           tables, leaves BENCHMARKS.md alone
#
# Environment: THREADS (default 2), ROUNDS, STEPS, WARMUP override the defaults below;
# BENCH_CONFIGS="preset:batch:seq ..." overrides the configurations; NO_APPEND=1 skips BENCHMARKS.md;
# SPEED=0 skips the step-time comparison, DILOCO=0 the DiLoCo sweep, COMPRESSION=0 the codec comparison,
# AGGREGATE=0 the aggregation benchmark; DILOCO_DATA (default ../shared/data/tinyshakespeare.txt) and
# DILOCO_ARGS / COMPRESSION_ARGS / AGGREGATE_ARGS (extra flags) change them.
# Needs scripts/setup.sh --test (the full torch wheel for the Python side) and a Rust toolchain.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

die() { echo "bench/run.sh: $*" >&2; exit 1; }

THREADS=${THREADS:-2}
if [ "$quick" = 1 ]; then
  ROUNDS=${ROUNDS:-1} STEPS=${STEPS:-3} WARMUP=${WARMUP:-1}
else
  ROUNDS=${ROUNDS:-3} STEPS=${STEPS:-10} WARMUP=${WARMUP:-2}
fi
# preset:batch:seq — a step of each takes ~0.5–2 s on 2 cores.
BENCH_CONFIGS=${BENCH_CONFIGS:-"small:8:256 base:4:512"}
SPEED=${SPEED:-1}
DILOCO=${DILOCO:-1}
COMPRESSION=${COMPRESSION:-1}
AGGREGATE=${AGGREGATE:-1}
DILOCO_DATA=${DILOCO_DATA:-../shared/data/tinyshakespeare.txt}
read -r -a diloco_args <<< "${DILOCO_ARGS:-}"
read -r -a compression_args <<< "${COMPRESSION_ARGS:-}"
read -r -a aggregate_args <<< "${AGGREGATE_ARGS:-}"

# --- environment -------------------------------------------------------------------------------------
[ -f scripts/env.sh ] || die "scripts/env.sh not found (run from an agora checkout)"
# shellcheck source=../scripts/env.sh
. scripts/env.sh || die "scripts/env.sh failed: run scripts/setup.sh --test first"
command -v cargo > /dev/null || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
if [ "$SPEED" = 1 ]; then
  [ -x "${AGORA_PYTHON:-}" ] || die "no Python at AGORA_PYTHON=${AGORA_PYTHON:-} (run scripts/setup.sh --test)"
  if ! torch_version=$("$AGORA_PYTHON" -c 'import torch; print(torch.__version__)' 2> /dev/null); then
    die "'import torch' fails in $AGORA_PYTHON: the PyTorch side needs the full wheel; run scripts/setup.sh --test"
  fi
fi
if { [ "$DILOCO" = 1 ] || [ "$COMPRESSION" = 1 ]; } && [ ! -f "$DILOCO_DATA" ]; then
  die "DiLoCo sweep: $DILOCO_DATA not found (set DILOCO_DATA=FILE, or DILOCO=0 to skip the sweep)"
fi

echo "bench: building agora (release)" >&2
cargo build --release -p agora-cli --quiet || die "cargo build --release -p agora-cli failed"
agora="$CARGO_TARGET_DIR/release/agora"
[ -x "$agora" ] || die "$agora missing after the build"

work=$(mktemp -d "${TMPDIR:-/tmp}/agora-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
results="$work/results.jsonl"
: > "$results"

# --- measure: agora and PyTorch alternately, never at the same time ---------------------------------
[ "$SPEED" = 1 ] || BENCH_CONFIGS=""
for cfg in $BENCH_CONFIGS; do
  IFS=: read -r preset batch seq <<< "$cfg"
  [ -n "$preset" ] && [ -n "$batch" ] && [ -n "$seq" ] || die "bad BENCH_CONFIGS entry '$cfg' (want preset:batch:seq)"
  "$agora" info --preset "$preset" --hf-config > "$work/$preset.json" || die "agora info --preset $preset --hf-config failed"
  common=(--batch-size "$batch" --seq-len "$seq" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --json)
  for round in $(seq 1 "$ROUNDS"); do
    echo "bench: $preset B=$batch T=$seq threads=$THREADS, round $round/$ROUNDS: agora" >&2
    "$agora" bench --preset "$preset" "${common[@]}" | tail -n 1 >> "$results" \
      || die "agora bench failed ($preset)"
    echo "bench: $preset B=$batch T=$seq threads=$THREADS, round $round/$ROUNDS: pytorch" >&2
    "$AGORA_PYTHON" bench/pytorch_llama.py --config "$work/$preset.json" --preset "$preset" "${common[@]}" \
      | tail -n 1 >> "$results" || die "bench/pytorch_llama.py failed ($preset)"
  done
done

# --- summarize -----------------------------------------------------------------------------------------
if [ "$SPEED" = 1 ]; then
"$AGORA_PYTHON" - "$results" > "$work/table.md" << 'EOF'
import json, math, sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
runs = defaultdict(lambda: defaultdict(list))  # (preset, B, T, threads) -> impl -> rows
for r in rows:
    runs[(r["preset"], r["batch_size"], r["seq_len"], r["threads"])][r["impl"]].append(r)

print("| preset | params | batch×seq | threads | agora ms/step | PyTorch ms/step | agora tok/s | PyTorch tok/s "
      "| ratio | agora MFU | PyTorch MFU | matmul peak GFLOP/s |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
notes = []
for (preset, b, t, threads), by_impl in runs.items():
    a, p = by_impl["agora"], by_impl["pytorch"]
    if a[0]["parameters"] != p[0]["parameters"]:
        sys.exit(f"{preset}: agora has {a[0]['parameters']} parameters, the PyTorch model {p[0]['parameters']}")
    best = {impl: min(rs, key=lambda r: r["ms_per_step"]) for impl, rs in (("agora", a), ("pytorch", p))}
    peak = max(r["matmul_peak_gflops"] for r in a + p)  # one denominator for both MFUs
    ms = {impl: r["ms_per_step"] for impl, r in best.items()}
    tok = {impl: b * t / (m / 1e3) for impl, m in ms.items()}
    mfu = {impl: best[impl]["model_gflops"] / peak for impl in best}
    print(f"| {preset} | {a[0]['parameters'] / 1e6:.2f}M | {b}×{t} | {threads} | {ms['agora']:.0f} | {ms['pytorch']:.0f} "
          f"| {tok['agora']:.0f} | {tok['pytorch']:.0f} | {ms['pytorch'] / ms['agora']:.2f} "
          f"| {100 * mfu['agora']:.1f}% | {100 * mfu['pytorch']:.1f}% | {peak:.0f} |")
    medians = lambda rs: ", ".join(f"{r['ms_per_step']:.0f}" for r in rs)
    notes.append(f"- {preset} {b}×{t}: per-round median ms/step — agora [{medians(a)}], PyTorch [{medians(p)}]; "
                 f"PyTorch initial loss {p[0]['initial_loss']:.3f} (ln vocab = "
                 f"{math.log(p[0]['vocab_size']):.3f})")
print()
print("\n".join(notes))
EOF
echo
cat "$work/table.md"
fi

# --- the DiLoCo sweep: one process, workers run one after another (see crates/cli/src/bench/sweep/mod.rs) ---
if [ "$DILOCO" = 1 ]; then
  diloco_cmd=(agora bench diloco --data "$DILOCO_DATA" --threads "$THREADS")
  [ "$quick" = 1 ] && diloco_cmd+=(--quick)
  diloco_cmd+=("${diloco_args[@]}")
  echo "bench: ${diloco_cmd[*]}" >&2
  started=$(date +%s)
  "$agora" "${diloco_cmd[@]:1}" > "$work/diloco.md" || die "agora bench diloco failed"
  diloco_minutes=$(( ($(date +%s) - started + 30) / 60 ))
  echo
  cat "$work/diloco.md"
fi

# --- the codec comparison and the aggregation benchmark (crates/cli/src/bench/compression.rs, aggregate.rs)
if [ "$COMPRESSION" = 1 ]; then
  compression_cmd=(agora bench compression --data "$DILOCO_DATA" --threads "$THREADS")
  [ "$quick" = 1 ] && compression_cmd+=(--quick)
  compression_cmd+=("${compression_args[@]}")
  echo "bench: ${compression_cmd[*]}" >&2
  started=$(date +%s)
  "$agora" "${compression_cmd[@]:1}" > "$work/compression.md" || die "agora bench compression failed"
  compression_minutes=$(( ($(date +%s) - started + 30) / 60 ))
  echo
  cat "$work/compression.md"
fi
if [ "$AGGREGATE" = 1 ]; then
  aggregate_cmd=(agora bench aggregate)
  [ "$quick" = 1 ] && aggregate_cmd+=(--preset tiny)
  aggregate_cmd+=("${aggregate_args[@]}")
  echo "bench: ${aggregate_cmd[*]}" >&2
  "$agora" "${aggregate_cmd[@]:1}" > "$work/aggregate.md" || die "agora bench aggregate failed"
  echo "bench: ${aggregate_cmd[*]} --coordinator --codecs none,int8,topk:2/64:2bit" >&2
  echo >> "$work/aggregate.md"
  "$agora" "${aggregate_cmd[@]:1}" --coordinator --codecs none,int8,topk:2/64:2bit >> "$work/aggregate.md" \
    || die "agora bench aggregate --coordinator failed"
  echo
  cat "$work/aggregate.md"
fi

if [ "$quick" = 1 ] || [ "${NO_APPEND:-0}" = 1 ]; then
  echo >&2
  echo "bench: not appended to BENCHMARKS.md (--quick or NO_APPEND=1)" >&2
  exit 0
fi

commit=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
if [ -n "$(git status --porcelain 2> /dev/null)" ]; then commit="$commit+dirty"; fi
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
if [ "$SPEED" = 1 ]; then
  {
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: $(nproc) cores, ${cpu:-unknown CPU}, $mem RAM. torch $torch_version (libtorch for both)."
    echo "Commit $commit. \`bench/run.sh\`: threads $THREADS, $ROUNDS alternating rounds × ($WARMUP warmup + $STEPS timed steps)."
    echo
    cat "$work/table.md"
  } >> BENCHMARKS.md
fi
# append_section TITLE COMMAND RESULTS [NOTE]: one dated section of BENCHMARKS.md for a sweep's Markdown output.
append_section() {
  {
    echo
    echo "## $1, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: $(nproc) cores, ${cpu:-unknown CPU}, $mem RAM. Commit $commit. \`$2\`${4:+ ($4)}."
    echo
    cat "$3"
  } >> BENCHMARKS.md
}
[ "$DILOCO" = 1 ] && append_section "DiLoCo sweep" "${diloco_cmd[*]}" "$work/diloco.md" "$diloco_minutes min"
[ "$COMPRESSION" = 1 ] \
  && append_section "Pseudo-gradient codecs" "${compression_cmd[*]}" "$work/compression.md" \
    "$compression_minutes min"
[ "$AGGREGATE" = 1 ] && append_section "Coordinator aggregation" "${aggregate_cmd[*]}" "$work/aggregate.md"
echo >&2
echo "bench: appended to BENCHMARKS.md" >&2
