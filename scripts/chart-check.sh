#!/usr/bin/env bash
# Checks the Helm chart offline (deploy/helm/check.py): rendered with Helm v4 as a library,
# linted, validated against the Kubernetes API schemas, scanned by checkov, invariants asserted.
# Installs its Python tools, pinned, into a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/chart-venv
if [ ! -x "$venv/bin/checkov" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 checkov==3.3.30 PyYAML==6.0.4
fi
# crdgen as the test build makes it (after `cargo test --workspace` this builds nothing).
cargo test -q --workspace --no-run 2>/dev/null
exec "$venv/bin/python" deploy/helm/check.py
