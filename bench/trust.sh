#!/usr/bin/env bash
# The adversarial suite: builds target/adversary/agora (the release profile plus the test-only misbehaving
# workers, kept apart from target/release/agora), runs `agora bench trust` and appends its table to TRUST.md.
# Environment: TRUST_ARGS adds flags (e.g. "--rounds 8 --aggregation median"); NO_APPEND=1 only prints.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=../scripts/env.sh
. scripts/env.sh
cargo build --profile adversary -p agora-cli --features adversary
read -r -a extra <<< "${TRUST_ARGS:-}"
cmd=("$CARGO_TARGET_DIR/adversary/agora" bench trust "${extra[@]}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
"${cmd[@]}" | tee "$work/trust.md"
minutes=$(( ($(date +%s) - started + 59) / 60 ))
[ "${NO_APPEND:-0}" = 1 ] && exit 0
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//' || true)
mem=$(free -h 2> /dev/null | awk '/^Mem:/ {print $2}' || echo unknown)
{
  echo
  echo "## Adversarial suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores, ${cpu:-unknown CPU}, $mem RAM. Commit $(git rev-parse --short HEAD). \`agora bench trust ${extra[*]}\` ($minutes min)."
  echo
  cat "$work/trust.md"
} >> TRUST.md
echo "bench/trust.sh: appended to TRUST.md" >&2
