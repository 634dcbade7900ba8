#!/usr/bin/env bash
# Register / spill / shared-memory report (ptxas -v) for every CUDA kernel in crates/rwkv-cuda.
#
# The PTX is produced exactly as the crate does at run time (src/compile.rs): NVRTC compiles
# common.cuh + "\n// ---- <file> ----\n" + <file> with the options
#   --gpu-architecture=sm_XY [-DHEAD_SIZE=N]      (no other options; cudarc adds none)
# and HEAD_SIZE only for files that mention it (wkv6.cu; 64 = released models, 8 = tiny test
# model, as in tests/nvrtc.rs). Each PTX then goes through `ptxas -v -arch=sm_XY` (default -O3).
#
# Needs: NVRTC 13.0 (scripts/nvrtc-env.sh) and ptxas from `pip install "nvidia-cuda-nvcc==13.0.*"`.
#   scripts/ptxas-report.sh              # print the Markdown section
#   scripts/ptxas-report.sh --update     # replace its section of benches/README.md in place
#   PTXAS=/path/to/ptxas ARCHS="sm_80 sm_90" HEAD_SIZES="64 8" scripts/ptxas-report.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091
source "$root/scripts/nvrtc-env.sh" >/dev/null
if [ -z "${PTXAS:-}" ]; then
    PTXAS=$(python3 - <<'PY'
import glob, os, site
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for p in glob.glob(os.path.join(root, "nvidia", "cu13", "bin", "ptxas")) + \
             glob.glob(os.path.join(root, "nvidia", "cuda_nvcc", "bin", "ptxas")):
        print(p); raise SystemExit
PY
)
fi
[ -x "${PTXAS:-}" ] || { echo "ptxas not found: pip install 'nvidia-cuda-nvcc==13.0.*'" >&2; exit 1; }
export PTXAS ROOT="$root" ARCHS="${ARCHS:-sm_80 sm_90}" HEAD_SIZES="${HEAD_SIZES:-64 8}"

section=$(python3 - <<'PY'
import ctypes, glob, os, re, subprocess, tempfile

root, ptxas = os.environ["ROOT"], os.environ["PTXAS"]
archs, head_sizes = os.environ["ARCHS"].split(), os.environ["HEAD_SIZES"].split()
kdir = os.path.join(root, "crates", "rwkv-cuda", "kernels")
prelude = open(os.path.join(kdir, "common.cuh")).read()

lib = None
for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") + [""]:
    try:
        lib = ctypes.CDLL(os.path.join(d, "libnvrtc.so.13") if d else "libnvrtc.so.13"); break
    except OSError:
        pass
if lib is None:
    raise SystemExit("libnvrtc.so.13 not found (source scripts/nvrtc-env.sh)")
maj, mnr = ctypes.c_int(), ctypes.c_int()
lib.nvrtcVersion(ctypes.byref(maj), ctypes.byref(mnr))
nvrtc_ver = f"{maj.value}.{mnr.value}"

def nvrtc(name, src, opts):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None) == 0
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
    if rc != 0:
        n = ctypes.c_size_t(); lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value); lib.nvrtcGetProgramLog(prog, log)
        raise SystemExit(f"NVRTC failed for {name} {opts}:\n{log.value.decode()}")
    n = ctypes.c_size_t(); lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value); lib.nvrtcGetPTX(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.value.decode()

ptxas_ver = re.search(r"V[\d.]+", subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout).group(0)
rows, spills = [], []
tmp = tempfile.mkdtemp(prefix="ptxas-report-")
for path in sorted(glob.glob(os.path.join(kdir, "*.cu"))):
    fname = os.path.basename(path)
    body = open(path).read()
    src = f"{prelude}\n// ---- {fname} ----\n{body}"   # compile.rs::full_source
    defsets = [[f"-DHEAD_SIZE={n}"] for n in head_sizes] if "HEAD_SIZE" in body else [[]]
    for arch in archs:
        for defs in defsets:
            opts = [f"--gpu-architecture={arch}"] + defs
            ptx_path = os.path.join(tmp, f"{fname}.{arch}{''.join(defs)}.ptx")
            open(ptx_path, "w").write(nvrtc(fname, src, opts))
            out = subprocess.run([ptxas, "-v", f"-arch={arch}", ptx_path, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
            cur = None
            for line in out.splitlines():
                m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
                if m:
                    cur = {"fn": m.group(1), "file": fname, "arch": m.group(2),
                           "defs": " ".join(defs) or "-", "stack": 0, "st": 0, "ld": 0,
                           "regs": 0, "smem": 0}
                    rows.append(cur); continue
                if cur is None:
                    continue
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m:
                    cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
                m = re.search(r"Used (\d+) registers", line)
                if m:
                    cur["regs"] = int(m.group(1))
                    s = re.search(r"(\d+) bytes smem", line)
                    cur["smem"] = int(s.group(1)) if s else 0

print("## CUDA kernels: registers and spills (ptxas -v)\n")
print(f"Generated by `scripts/ptxas-report.sh` (NVRTC {nvrtc_ver}, ptxas {ptxas_ver}). "
      "Each file is compiled as `src/compile.rs` does at run time (prelude `common.cuh` + file, "
      "`nvrtcCompileProgram` with `--gpu-architecture=sm_XY` and `-DHEAD_SIZE=N` for `wkv6.cu` only; "
      f"head sizes {', '.join(head_sizes)}; 64 and 8 are the ones `tests/nvrtc.rs` compiles), then the PTX goes through\n"
      "`ptxas -v -arch=sm_XY <file>.ptx -o /dev/null` (default -O3). Shared memory is static `smem`; "
      "stack is the per-thread local frame.\n")
print("| kernel | file | defines | arch | registers | spill stores (B) | spill loads (B) | stack (B) | shared mem (B) |")
print("|---|---|---|---|--:|--:|--:|--:|--:|")
for r in sorted(rows, key=lambda r: (r["file"], r["fn"], r["defs"], r["arch"])):
    flag = " **SPILL**" if r["st"] or r["ld"] else ""
    print(f"| `{r['fn']}`{flag} | {r['file']} | {r['defs']} | {r['arch']} | {r['regs']} | {r['st']} | {r['ld']} | {r['stack']} | {r['smem']} |")
    if flag:
        spills.append(f"`{r['fn']}` ({r['arch']}, {r['defs']}): {r['st']} B stores / {r['ld']} B loads")
import shutil; shutil.rmtree(tmp, ignore_errors=True)
print()
if spills:
    print("Kernels with register spills: " + "; ".join(spills) + ".")
else:
    print(f"No kernel spills registers on any of {', '.join(archs)} ({len(rows)} kernel/arch/define combinations).")
PY
)

if [ "${1:-}" = "--update" ]; then
    readme="$root/benches/README.md"
    heading="## CUDA kernels: registers and spills (ptxas -v)"
    # Replace the section (from its heading to the next `## ` heading, or the end) in place;
    # sections after it are kept. Without it, append.
    SECTION="$section" HEADING="$heading" python3 - "$readme" <<'PY'
import os, sys
path, heading, section = sys.argv[1], os.environ["HEADING"], os.environ["SECTION"].rstrip("\n")
lines = open(path).read().split("\n")
if heading in lines:
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    after = "\n".join(lines[end:])
    before = "\n".join(lines[:start]).rstrip("\n")
    text = before + "\n\n" + section + "\n" + ("\n" + after if after else "")
else:
    text = "\n".join(lines).rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
    echo "updated $readme" >&2
else
    echo "$section"
fi
