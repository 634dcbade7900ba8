#!/usr/bin/env bash
# Validates everything under deploy/ without a cluster, a Docker daemon or the network: the
# Kubernetes manifests against the API's JSON schemas, the compose file against the Compose
# Specification, the Dockerfiles with BuildKit's parser, the example configs and every RWKV_*
# variable against the flags in crates/rwkv-cli/src, and the Grafana dashboard's PromQL and metric
# names against the sources. deploy/validate.py says what each check does.
#
#   deploy/validate.sh             # tools already installed (by --install)
#   deploy/validate.sh --install   # first install them from PyPI into a virtual environment (CI)
#
# The tools (deploy/validate-requirements.txt) go to $DEPLOY_VENV, target/deploy-venv by default.
# K8S_VERSIONS (space-separated, default "1.30.0 <newest bundled>") picks the Kubernetes versions.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DEPLOY_VENV:-target/deploy-venv}
if [ "${1:-}" = "--install" ]; then
    shift
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r deploy/validate-requirements.txt
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "deploy/validate.sh: no tools in $venv: run \`deploy/validate.sh --install\` first" >&2
    exit 2
fi
exec "$venv/bin/python" deploy/validate.py "$@"
