#!/usr/bin/env bash
# Rounds of one case on one machine, tuna (the default, then TUNA_NORM=op) and the PyTorch + PEFT
# peer alternating, so that each side's spread and the ratio's come from the same call (PEFT's
# figure moved 29.6k -> 42.7k tok/s between two calls of one H100 on 2026-12-07). Carry .gl and
# .dev/tuna.xz. SHAPE (smollm2-135m), ROUNDS (3); writes $OUT/rounds.jsonl and prints a table.
set -u
. bench/device_env.sh
SHAPE=${SHAPE:-smollm2-135m}
ROUNDS=${ROUNDS:-3}
: >"$OUT/rounds.jsonl"
row() { # label, then the command; its last JSON line goes to rounds.jsonl under that label
  local label=$1; shift
  local line
  line=$("$@" 2>>"$OUT/rounds.log" | grep '^{' | tail -1)
  echo "{\"label\": \"$label\", \"out\": ${line:-null}}" >>"$OUT/rounds.jsonl"
}
for r in $(seq "$ROUNDS"); do
  row tuna timeout 150 /tmp/tuna bench train --device vulkan --shape "$SHAPE" --dtype f16
  row tuna-norm-op env TUNA_NORM=op timeout 150 /tmp/tuna bench train --device vulkan --shape "$SHAPE" --dtype f16
  row peft timeout 150 python3 bench/peer_peft.py --shape "$SHAPE" --dtype f16
done
python3 - "$OUT/rounds.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append((r["out"] or {}).get("tokens_per_s", 0))
for label, v in by.items():
    print(f"{label:14s} " + " ".join(f"{x:9.0f}" for x in v) + f"   median {statistics.median(v):9.0f}")
peft = statistics.median(by.get("peft", [0]))
for label in ("tuna", "tuna-norm-op"):
    if peft and label in by:
        print(f"{label} / peft, medians: {statistics.median(by[label]) / peft:.2f}")
PY
