#!/usr/bin/env bash
# The serverless example end to end on this machine, as it runs on Google Cloud: Cloud Storage
# and Firestore emulators (started here, stopped on exit), one functions-framework process per
# client and per aggregator function (started and stopped by `flwr-kd cloud emulate`), a FedDF
# run of 4 clients and 2 rounds, then its audit.
#
#   examples/serverless/run_emulated.sh [OUT_DIR] [more `flwr-kd cloud emulate` flags]
#
# OUT_DIR (default runs/serverless-example) receives result.json and accuracy.png; later flags
# override the ones below (e.g. --rounds 5). FLWR_KD names the flwr-kd command (default: the
# one on PATH), RUN_ID the run (default: generated).
set -euo pipefail

FLWR_KD=${FLWR_KD:-flwr-kd}
OUT=${1:-runs/serverless-example}
shift || true
RUN=${RUN_ID:-example-$(date +%s)}

# `flwr-kd cloud emulators` keeps both emulators up until it is stopped, so that the audit
# below reads the records the run left; it prints their environment first.
log=$(mktemp)
$FLWR_KD cloud emulators >"$log" 2>&1 &
emulators=$!
trap 'kill "$emulators" 2>/dev/null || true; wait "$emulators" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 180); do
  grep -q '^export ' "$log" && break
  kill -0 "$emulators" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 1
done
eval "$(grep '^export ' "$log")"
echo "emulators: STORAGE_EMULATOR_HOST=$STORAGE_EMULATOR_HOST FIRESTORE_EMULATOR_HOST=$FIRESTORE_EMULATOR_HOST"

$FLWR_KD cloud emulate --strategy feddf --dataset digits --clients 4 --rounds 2 \
  --archs resnet10t,mobilenetv3_small_050,test_vit --run-id "$RUN" --out "$OUT" "$@"
$FLWR_KD cloud audit "$RUN"
