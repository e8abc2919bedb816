#!/bin/bash
# The audit table of the README: tiny preset (make demo's world and base), configs/world_dp.yaml
# at epsilon 8, 2, 1 and configs/world_dpo.yaml (non-private), gradient and input canaries.
set -e
cd "$(dirname "$0")/../../.."
O=${AUDIT_OUT:-runs/audit-tiny}
mkdir -p $O
for kind in gradient input; do
  for eps in 8 2 1; do
    [ -f $O/$kind-eps$eps/audit.json ] || /usr/bin/time -f "%e s" -o $O/$kind-eps$eps.time \
      .venv/bin/dpalign audit --config configs/world_dp.yaml --out $O/$kind-eps$eps --kind $kind \
      privacy.target_epsilon=$eps eval.world=false
  done
  [ -f $O/$kind-inf/audit.json ] || /usr/bin/time -f "%e s" -o $O/$kind-inf.time \
    .venv/bin/dpalign audit --config configs/world_dpo.yaml --out $O/$kind-inf --kind $kind \
    eval.world=false
done
