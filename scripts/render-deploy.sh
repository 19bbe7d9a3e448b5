#!/usr/bin/env bash
# Renders the chart's defaults into deploy/base (plain manifests for kustomize)
# and the CRD from the operator's crdgen into the chart. tests/deploy.rs checks
# that both are up to date, and that deploy/overlays/gpu equals the chart
# rendered with helm/nexus-fleet/ci/gpu-values.yaml.
#
#   bash scripts/render-deploy.sh    (after scripts/setup.sh and a build)
set -euo pipefail
cd "$(dirname "$0")/.."
helm=.tools/bin/helm
"${CARGO_TARGET_DIR:-target}/debug/crdgen" > helm/nexus-fleet/crds/transcriptionjobs.yaml
{
  echo "# Rendered from helm/nexus-fleet (default values) by scripts/render-deploy.sh; do not edit."
  "$helm" template nexus-fleet helm/nexus-fleet --namespace nexus --include-crds
} > deploy/base/nexus-fleet.yaml
echo "deploy/base/nexus-fleet.yaml and the chart's CRD are up to date" >&2
