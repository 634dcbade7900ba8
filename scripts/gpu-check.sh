#!/usr/bin/env bash
# GPU checks with prebuilt test binaries: the GPU machine has CUDA (driver, toolkit, PyTorch's
# Python env with the nvidia-* wheels) but no Rust toolchain.
#
# 1. Here, build the GPU test binaries and copy them into .carry/bin/:
#        scripts/gpu-check.sh --build
#    (= cargo test --release -p rwkv-cuda --test gpu --test nvrtc --no-run and
#       cargo test --release -p rwkv-tests --features cuda --test cuda --no-run, executables copied;
#       release, so the host side of the timings is optimised.)
# 2. There, from the repository root, with .carry/ carried along:
#        bash scripts/gpu-check.sh
#    Runs every binary in .carry/bin with `--include-ignored --nocapture --test-threads=1`
#    (`--include-ignored` so the NVRTC test, which is not ignored, runs too), keeps going after
#    a failure, writes each log to $OUT/gpu-check (or /tmp/gpu-check) and prints a summary
#    table last. Exit status: 0 only if every binary passed.
# Environment: GPU_CHECK_TIMEOUT (seconds per binary, default 300), GPU_CHECK_FILTER (a test
# name filter passed to every binary), GPU_CHECK_SKIP_TESTS=1 (only the serving benchmark),
# GPU_CHECK_SERVE=0 (skip the serving benchmark), GPU_CHECK_SERVE_SWEEP / _PROMPTS / _TIMEOUT.
set -u
cd "$(dirname "$0")/.." || exit 2
BIN=.carry/bin

if [ "${1:-}" = "--build" ]; then
    set -e
    rm -rf "$BIN"
    mkdir -p "$BIN"
    pwd > "$BIN/BUILD_ROOT"
    {
        cargo test --release -p rwkv-cuda --test gpu --test nvrtc --no-run --message-format=json
        cargo test --release -p rwkv-tests --features cuda --test cuda --no-run --message-format=json
    } | python3 -c '
import json, shutil, subprocess, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and "test" in m["target"]["kind"]:
        dst = sys.argv[1] + "/" + m["target"]["name"]
        shutil.copy2(exe, dst)
        # Debug info is most of the size; the device machine takes 64 MiB in all.
        subprocess.run(["strip", "--strip-debug", dst], check=False)
        print("copied", dst)
' "$BIN"
    # The CLI, for an end-to-end smoke run of `--backend cuda` (not a test binary: kept apart).
    cargo build --release -p rwkv-cli
    mkdir -p .carry/cli
    # Fully stripped (19 MiB rather than 23 with symbols): the tracked tree, the test binaries
    # and the CLI must stay under the device tool's 64 MiB.
    cp target/release/rwkv .carry/cli/rwkv && strip -s .carry/cli/rwkv
    du -sh "$BIN" .carry/cli
    exit 0
fi

if [ ! -d "$BIN" ] || [ -z "$(ls "$BIN" 2>/dev/null | grep -v BUILD_ROOT)" ]; then
    echo "no test binaries in $BIN: run 'scripts/gpu-check.sh --build' on the build machine and carry .carry/" >&2
    exit 2
fi

# The binaries find fixtures through absolute paths of the build tree; point that path here.
if [ -f "$BIN/BUILD_ROOT" ]; then
    root=$(cat "$BIN/BUILD_ROOT")
    if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
        mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root" && echo "linked $root -> $PWD"
    fi
fi

# CUDA libraries: the driver's libcuda, and libnvrtc / libcublas from the toolkit or the wheels.
libdirs=""
add_dir() { [ -d "$1" ] && case ":$libdirs:" in *":$1:"*) ;; *) libdirs="${libdirs:+$libdirs:}$1" ;; esac; }
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    add_dir "$d"
done
for d in $(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        print(lib)
PY
); do
    add_dir "$d"
done
# NCCL (tensor parallelism): PyTorch's wheel ships only libnccl.so.2, a name cudarc does not
# try; a libnccl.so symlink to it in a directory of our own makes it loadable.
nccl=""
for d in ${libdirs//:/ }; do
    [ -e "$d/libnccl.so.2" ] && nccl="$d/libnccl.so.2" && break
done
if [ -n "$nccl" ]; then
    nccl_dir=$(mktemp -d)
    ln -s "$nccl" "$nccl_dir/libnccl.so"
    add_dir "$nccl_dir"
fi
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so libnvrtc.so libcublas.so libcublasLt.so libnccl.so; do
    found=""
    for d in ${LD_LIBRARY_PATH//:/ } /usr/lib/x86_64-linux-gnu /usr/lib64; do
        f=$(ls "$d"/$lib* 2>/dev/null | head -1)
        if [ -n "$f" ]; then found=$f; break; fi
    done
    echo "  $lib: ${found:-NOT FOUND}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"

LOGS="${OUT:-/tmp}/gpu-check"
mkdir -p "$LOGS"
summary=()
failed=0
for bin in "$BIN"/*; do
    name=$(basename "$bin")
    [ "$name" = BUILD_ROOT ] && continue
    [ "${GPU_CHECK_SKIP_TESTS:-0}" = 1 ] && continue
    chmod +x "$bin" 2>/dev/null
    log="$LOGS/$name.log"
    echo
    echo "===== $name"
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout "${GPU_CHECK_TIMEOUT:-300}" "$bin" --include-ignored --nocapture --test-threads=1 ${GPU_CHECK_FILTER:-} 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - start ))
    result=$(grep -E "^test result:" "$log" | tail -1 | sed 's/^test result: //; s/; finished in.*//')
    [ "$rc" -ne 0 ] && failed=1
    summary+=("$(printf '%-8s %4s %6ss  %s' "$name" "$rc" "$secs" "${result:-no result line (crash or timeout?)}")")
done

# End to end through the CLI: the same tokens on both backends, and a greedy generation.
if [ -x .carry/cli/rwkv ] && [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
    echo
    echo "===== cli"
    m=tests/fixtures/rwkv6-tiny-c256-l3.safetensors
    toks=1,5,9,200,31,77,400,12,999,3
    cli_rc=0
    # compare NAME: fwd-NAME-cuda vs fwd-NAME-cpu, every tensor within 2e-3 relative L2.
    compare() {
        python3 - "$LOGS" "$1" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
d, name = sys.argv[1], sys.argv[2]
a = load_file(f"{d}/fwd-{name}-cuda.safetensors"); b = load_file(f"{d}/fwd-{name}-cpu.safetensors")
worst = max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in b)
print(f"cli forward {name} cuda vs cpu: worst relative L2 over {len(b)} tensors {worst:.2e}")
sys.exit(0 if worst <= 2e-3 else 1)
PY
    }
    .carry/cli/rwkv forward --backend cuda --model $m --tokens $toks --output "$LOGS/fwd-split-cuda.safetensors" || cli_rc=1
    .carry/cli/rwkv forward --backend cpu --model $m --tokens $toks --output "$LOGS/fwd-split-cpu.safetensors" || cli_rc=1
    compare split || cli_rc=1
    # --gpu-precision bf16 on the trained model ("The cat sat" as it was trained: a 0 after
    # each byte), where rounded GEMM inputs should stay within the same 2e-3.
    real=tests/fixtures/real/tiny-rwkv-6v0-1m.safetensors
    text=84,0,104,0,101,0,32,0,99,0,97,0,116,0,32,0,115,0,97,0,116,0
    .carry/cli/rwkv forward --backend cuda --gpu-precision bf16 --model $real --tokens $text --output "$LOGS/fwd-bf16-cuda.safetensors" || cli_rc=1
    .carry/cli/rwkv forward --backend cpu --model $real --tokens $text --output "$LOGS/fwd-bf16-cpu.safetensors" || cli_rc=1
    compare bf16 || cli_rc=1
    .carry/cli/rwkv generate --backend cuda --model $m --prompt a --max-tokens 16 --temperature 0 || cli_rc=1
    [ "$cli_rc" -ne 0 ] && failed=1
    summary+=("$(printf '%-8s %4s %6ss  %s' cli "$cli_rc" - "forward cuda vs cpu (split; bf16 on the trained model), generate --backend cuda")")
fi

# Serving on the GPU: `rwkv serve --backend cuda` on a random-weight 1.6B-shaped model, loaded
# by `rwkv bench serve` with a concurrency sweep (skip with GPU_CHECK_SERVE=0).
if [ -x .carry/cli/rwkv ] && [ "${GPU_CHECK_SERVE:-1}" != 0 ]; then
    echo
    echo "===== serve"
    serve_rc=0
    model=/tmp/bench-1b6.safetensors
    [ -f $model ] || .carry/cli/rwkv bench --make-model 2048,24,65536 $model > /dev/null || serve_rc=1
    RUST_LOG=warn .carry/cli/rwkv serve --model $model --backend cuda --slots 256 \
        --max-batch-tokens 4096 --listen 127.0.0.1:8000 > "$LOGS/serve.log" 2>&1 &
    serve_pid=$!
    for _ in $(seq 1 120); do
        curl -sf localhost:8000/ready > /dev/null 2>&1 && break
        sleep 1
    done
    if curl -sf localhost:8000/ready > /dev/null 2>&1; then
        # One user alone (few prompts: each takes 128 sequential steps), then a sweep where
        # every point has enough prompts to fill its concurrency.
        timeout 90 .carry/cli/rwkv bench serve --endpoint http://127.0.0.1:8000 \
            --concurrency 1 --num-prompts 12 --input-len 256 --output-len 128 \
            --json "$LOGS/bench-serve-c1.json" 2>&1 | tee "$LOGS/bench-serve-c1.log"
        serve_rc=${PIPESTATUS[0]}
        timeout "${GPU_CHECK_SERVE_TIMEOUT:-180}" .carry/cli/rwkv bench serve \
            --endpoint http://127.0.0.1:8000 --concurrency "${GPU_CHECK_SERVE_SWEEP:-16,64,256}" \
            --num-prompts "${GPU_CHECK_SERVE_PROMPTS:-256}" --input-len 256 --output-len 128 \
            --json "$LOGS/bench-serve.json" --plot "$LOGS/bench-serve.svg" 2>&1 | tee "$LOGS/bench-serve.log"
        [ "${PIPESTATUS[0]}" -ne 0 ] && serve_rc=1
        curl -s localhost:8000/metrics > "$LOGS/serve-metrics.txt" 2>/dev/null
    else
        echo "rwkv serve did not become ready; its log:"; tail -20 "$LOGS/serve.log"
        serve_rc=1
    fi
    kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null
    [ "$serve_rc" -ne 0 ] && failed=1
    summary+=("$(printf '%-8s %4s %6ss  %s' serve "$serve_rc" - "rwkv serve --backend cuda + rwkv bench serve (1.6B shape)")")
fi

echo
echo "===== summary (logs in $LOGS)"
printf '%-8s %4s %7s  %s\n' binary exit time result
for line in "${summary[@]}"; do echo "$line"; done
grep -h -E "^(timing|wkv on|engine on CUDA|cli forward)" "$LOGS"/*.log 2>/dev/null
exit $failed
