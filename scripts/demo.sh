#!/usr/bin/env bash
# Sets up (as scripts/setup.sh does), then runs `ppfast demo`: a small GPT-style model trained
# pipelined on 2 local ranks (gloo processes on CPU), on data generated from a seed. It profiles
# the stages, runs the schedule the simulator finds fastest, checks the first steps' losses
# against the same model on one device, and writes out/demo/: timeline.png (measured),
# timeline_simulated.png, trace.json (open it in https://ui.perfetto.dev) and metrics.json.
#
#   bash scripts/demo.sh                      # the defaults: about a minute on 2 cores
#   bash scripts/demo.sh --schedule 1f1b      # any `ppfast demo` flag (`ppfast demo -h`)
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

step "ppfast demo"
ppfast demo --out out/demo "$@"
