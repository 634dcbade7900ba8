#!/usr/bin/env bash
# Runs `rwkv bench` and the official rwkv package (shared/tools/ref_bench.py, "cpu bf16" and
# "cpu fp32") side by side on the same random-weight RWKV-6 0.2B-shaped model, and prints the
# ratios the fast-CPU issue asks for.
#
#   benches/compare-peer.sh [MODEL_DIR] [PROMPT] [GEN]
#
# Environment: PY (python of a venv with torch, rwkv, safetensors; default /work/refenv/bin/python),
# THREADS (default 2), REPEAT (runs of each side, best kept; default 2), SKIP_FP32=1.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/work/bench-models}
P=${2:-256}
G=${3:-32}
PY=${PY:-/work/refenv/bin/python}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-2}
REF_BENCH=${REF_BENCH:-../shared/tools/ref_bench.py}
ST=$DIR/rwkv6-0.2b-c768-l12.safetensors
PTH=$DIR/rwkv6-0.2b-c768-l12.pth
mkdir -p "$DIR"

cargo build --release -q -p rwkv-cli
RWKV=target/release/rwkv
[ -f "$ST" ] || "$RWKV" bench --make-model 768,12,65536 "$ST" --seed 0
if [ ! -f "$PTH" ]; then
    "$PY" -c "import sys, torch, safetensors.torch as s; torch.save(s.load_file(sys.argv[1]), sys.argv[2])" "$ST" "$PTH"
fi

echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cpus; load: $(cut -d' ' -f1-3 /proc/loadavg)"
OUT=$(mktemp)
best() { # best of REPEAT runs of a command printing one JSON line
    for _ in $(seq "$REPEAT"); do "$@" 2>/dev/null | tail -1; done
}
{
    best env THREADS="$THREADS" "$PY" "$REF_BENCH" "$PTH" "cpu bf16" "$P" "$G" | sed 's/^/json peer_bf16 /'
    [ "${SKIP_FP32:-0}" = 1 ] || best env THREADS="$THREADS" "$PY" "$REF_BENCH" "$PTH" "cpu fp32" "$P" "$G" | sed 's/^/json peer_fp32 /'
    for prec in bf16 int8; do
        best "$RWKV" bench --model "$ST" --batch 1 --prompt-tokens "$P" --gen-tokens "$G" --precision $prec --threads "$THREADS" --json | sed "s/^/json ours_${prec}_b1 /"
    done
    best "$RWKV" bench --model "$ST" --batch 16 --prompt-tokens 16 --gen-tokens "$G" --precision bf16 --threads "$THREADS" --json | sed 's/^/json ours_bf16_b16 /'
    best "$RWKV" bench --model "$ST" --batch 16 --prompt-tokens 16 --gen-tokens "$G" --precision int8 --threads "$THREADS" --json | sed 's/^/json ours_int8_b16 /'
} | tee "$OUT"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    _, tag, js = line.split(" ", 2)
    d = json.loads(js)
    b = best.setdefault(tag, {"prefill_tok_s": 0.0, "decode_tok_s": 0.0})
    for k in b:
        b[k] = max(b[k], d[k])
print("\n%-14s %12s %12s" % ("run", "prefill tok/s", "decode tok/s"))
for tag, b in best.items():
    print("%-14s %12.1f %12.1f" % (tag, b["prefill_tok_s"], b["decode_tok_s"]))
pb, o1, o16 = best["peer_bf16"], best["ours_bf16_b1"], best["ours_bf16_b16"]
print("\ndecode b1 bf16 / peer cpu bf16 decode : %.2fx (target >= 1.5)" % (o1["decode_tok_s"] / pb["decode_tok_s"]))
print("prefill bf16 / peer cpu bf16 prefill  : %.2fx (target >= 1.5)" % (o1["prefill_tok_s"] / pb["prefill_tok_s"]))
print("decode b16 / our b1 (bf16)            : %.2fx (target >= 8)" % (o16["decode_tok_s"] / o1["decode_tok_s"]))
if "peer_fp32" in best:
    pf = best["peer_fp32"]
    print("decode b1 bf16 / peer cpu fp32 decode : %.2fx" % (o1["decode_tok_s"] / pf["decode_tok_s"]))
    print("prefill bf16 / peer cpu fp32 prefill  : %.2fx" % (o1["prefill_tok_s"] / pf["prefill_tok_s"]))
i1, i16 = best["ours_int8_b1"], best["ours_int8_b16"]
print("decode b1 int8 / peer cpu bf16 decode : %.2fx" % (i1["decode_tok_s"] / pb["decode_tok_s"]))
print("decode b16 / b1 (int8)                : %.2fx" % (i16["decode_tok_s"] / i1["decode_tok_s"]))
PY
rm -f "$OUT"
