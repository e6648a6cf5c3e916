#!/usr/bin/env bash
# Sets up (as scripts/setup.sh does), then simulates 1F1B and ZB-V for 4 ranks and 8
# microbatches and draws them: out/1f1b.png, out/zb-v.png and their Chrome traces (open them in
# https://ui.perfetto.dev).
#
#   bash scripts/demo.sh
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

step "simulating"
mkdir -p out
for schedule in 1f1b zb-v; do
  ppfast simulate --schedule "$schedule" -p 4 -m 8 --png "out/$schedule.png" \
    --trace "out/$schedule.json"
done
ppfast simulate --schedule auto -p 4 -m 8 --costs 1,2,1,0.2 --mem-cap 6
