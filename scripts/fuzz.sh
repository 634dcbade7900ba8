#!/usr/bin/env bash
# Fuzzes the parsers that read untrusted input (see fuzz/README.md, "Fuzzing").
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]    (default 60)
#
# Needs the nightly toolchain and cargo-fuzz (installed here if missing). Not part of CI: CI has
# no nightly guarantee. Environment:
#   FUZZ_TARGETS  space-separated targets (default: all)
#   FUZZ_TOOLCHAIN  toolchain for cargo-fuzz (default: nightly)
#   CARGO_BUILD_JOBS  build parallelism (default here: 1)
# Each target runs as one libFuzzer process (one job, one worker) with a 2 GiB RSS limit and a
# 1 GiB single-allocation limit, so a length field that drives a huge allocation is a failure.
# Corpora grow in fuzz/corpus/<target> (git-ignored); seeds are rebuilt from tests/fixtures into
# fuzz/seeds/<target> on every run; crashes land in fuzz/artifacts/<target>; logs in fuzz/logs.
set -euo pipefail

secs=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
toolchain=${FUZZ_TOOLCHAIN:-nightly}
targets=${FUZZ_TARGETS:-"pickle pth safetensors weights tokenizer state_import"}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo +stable install cargo-fuzz --locked
fi

cd "$root/fuzz"
cargo "+$toolchain" fuzz build
bin="target/x86_64-unknown-linux-gnu/release"

rm -rf seeds
"$bin/gen_seeds" "$root/tests/fixtures" seeds
mkdir -p logs

failed=0
summary=()
for t in $targets; do
    mkdir -p "corpus/$t"
    log="logs/$t.log"
    set +e
    cargo "+$toolchain" fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=20 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1 || true)
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        failed=1
        why=$(grep -m1 -oE 'ERROR: libFuzzer: [a-z-]+|panicked at [^ ]+' "$log" || echo "exit $rc")
        artifact=$(grep -m1 -oE 'Test unit written to [^ ]+' "$log" | sed 's/Test unit written to //' || true)
        result="FAILED ($why) ${artifact:+$artifact}"
    fi
    line=$(printf '%-13s %4ss  execs=%-10s %-32s %s' "$t" "$secs" "${execs:-?}" "${cov:-cov: ?}" "$result")
    echo "$line"
    summary+=("$line")
done

echo
echo "== fuzz summary ($(date -u +%Y-%m-%dT%H:%MZ), ${secs}s per target) =="
printf '%s\n' "${summary[@]}"
exit "$failed"
