#!/usr/bin/env bash
# Source this file to put NVRTC (from PyPI's nvidia-cuda-nvrtc wheel, CUDA 13.0) on the loader
# path, so tests can compile the CUDA kernels on machines without a GPU or a CUDA install.
#   source scripts/nvrtc-env.sh            # use an installed wheel if there is one
#   source scripts/nvrtc-env.sh --install  # install the wheel first (CI)
NVRTC_WHEEL="nvidia-cuda-nvrtc==13.0.*"
if [ "${1:-}" = "--install" ]; then
    python3 -m pip install --quiet --disable-pip-version-check "$NVRTC_WHEEL"
fi
_nvrtc_dir=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for lib in glob.glob(os.path.join(root, "nvidia", "cu13", "lib", "libnvrtc.so*")) + \
               glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")):
        print(os.path.dirname(lib)); raise SystemExit
PY
)
if [ -n "$_nvrtc_dir" ]; then
    export LD_LIBRARY_PATH="$_nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "NVRTC: $_nvrtc_dir"
else
    echo "NVRTC: not found (pip install '$NVRTC_WHEEL'); kernel compile tests will skip outside CI"
fi
unset _nvrtc_dir
