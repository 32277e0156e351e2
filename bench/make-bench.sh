#!/usr/bin/env bash
# The runs of `make bench`, its binaries built. The two hour-long live-chain runs (10k × 3,
# tokenExchangeInterval 1h, a tenth of STS's quota; glibc and musl) start first, in the
# background, each on a control plane of its own; once both are past their first pass (they then
# mostly wait on the pacing) the other runs go one after another. Progress lines are prefixed
# with the run; the chain runs' tables print at the end. Fails when any run fails.
set -euo pipefail

bench=target/release/authprobe-bench
musl=target/x86_64-unknown-linux-musl/release/authprobe
mimalloc=target/mimalloc/x86_64-unknown-linux-musl/release/authprobe
chain_1h=(--namespaces 10000 --chain --token-exchange-interval-seconds 3600 --google-quota-share 0.1 --skip-baseline)
logs=$(mktemp -d)

background() { # name, args...: a run in the background (its pid in $!), stderr kept and prefixed
  local name=$1; shift
  "$bench" "$@" --out "bench/results/$name.json" >"$logs/$name.table" \
    2> >(tee "$logs/$name.err" | sed -u "s/^/[$name] /" >&2) &
}
background 10k-chain-1h "${chain_1h[@]}"
glibc=$!
background 10k-chain-1h-musl "${chain_1h[@]}" --operator "$musl"
static=$!
trap 'kill $glibc $static 2>/dev/null || true' EXIT

# Populating 2 × 30,000 objects and the first passes take both cores for minutes; wait for them
# (at most 20 minutes) so the runs below measure a machine that only carries the chains' pacing.
for _ in $(seq 240); do
  done_both=true
  for name in 10k-chain-1h 10k-chain-1h-musl; do
    grep -q "every probe complete" "$logs/$name.err" 2>/dev/null || done_both=false
  done
  $done_both && break
  kill -0 "$glibc" 2>/dev/null && kill -0 "$static" 2>/dev/null || break
  sleep 5
done

"$bench" --namespaces 1000 --out bench/results/1k.json
"$bench" --namespaces 10000 --out bench/results/10k.json
"$bench" --namespaces 1000 --chain --skip-baseline --interval-seconds 120 --samples 10 --out bench/results/1k-chain.json
"$bench" --namespaces 10000 --workloads --federation-probes 2 --skip-baseline --out bench/results/10k-workloads.json
"$bench" --namespaces 10000 --skip-baseline --operator "$musl" --out bench/results/10k-musl.json
"$bench" --namespaces 10000 --workloads --federation-probes 2 --skip-baseline --operator "$musl" --out bench/results/10k-workloads-musl.json
if [ -n "${MIMALLOC:-}" ]; then
  "$bench" --namespaces 10000 --skip-baseline --operator "$mimalloc" --out bench/results/10k-musl-mimalloc.json
  "$bench" --namespaces 10000 --workloads --federation-probes 2 --skip-baseline --operator "$mimalloc" --out bench/results/10k-workloads-musl-mimalloc.json
fi

rc=0
wait "$glibc" || rc=$?
wait "$static" || rc=$?
trap - EXIT
cat "$logs/10k-chain-1h.table" "$logs/10k-chain-1h-musl.table"
rm -rf "$logs"
exit $rc
