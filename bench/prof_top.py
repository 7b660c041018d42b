#!/usr/bin/env python3
"""Sums a cubecl profile log (CUBECL_DEBUG_OPTION=profile-medium, written to CUBECL_DEBUG_LOG)
per kernel: total time, share and launch count, the largest first.

usage: prof_top.py LOG [N] [NOTE]   (N rows, 30 by default; NOTE follows the total line)
"""
import collections, re, sys

UNIT = {'ns': 1e-9, 'µs': 1e-6, 'us': 1e-6, 'ms': 1e-3, 's': 1.0}
log, rows = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
note = f" {sys.argv[3]}" if len(sys.argv) > 3 else ""
tot, cnt = collections.Counter(), collections.Counter()
for line in open(log, errors='replace'):
    parts = [p.strip() for p in line.split('|') if p.strip()]
    if len(parts) < 2:
        continue
    m = re.match(r'^([0-9.]+)\s*(ns|µs|us|ms|s)$', parts[0])
    if not m:
        continue
    name = re.sub(r'<.*', '', parts[1])[:90]
    tot[name] += float(m.group(1)) * UNIT[m.group(2)]
    cnt[name] += 1
a = sum(tot.values())
print(f"total {a:.3f} s over {sum(cnt.values())} launches{note}")
for n, t in tot.most_common(rows):
    print(f"{t:9.4f} s {100 * t / max(a, 1e-12):5.1f}% {cnt[n]:7d}  {n}")
