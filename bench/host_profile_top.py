#!/usr/bin/env python3
"""Sums up `tuna bench train --host-profile FILE` (folded stacks: `thread;outer;...;inner count`).

Prints, per thread (busiest first): its samples, the crates its time is spent in (by the
innermost frame), the functions with the most self time, and the functions with the most
inclusive time (each counted once per stack) among tuna's, burn's and cubecl's. pprof drops the
samples taken inside libc, libgcc, pthread and the vDSO (bench::host_profile), so every share is
of the time outside them; and the kernel hands the timer's signal to one thread at a time, so the
threads' shares of the samples are not their shares of a core (bench/host_gpu_timeline.py has
those).

usage: host_profile_top.py FILE [N]
"""
import collections
import re
import sys


def crate(frame):
    f = frame.lstrip("<")
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", f)
    return m.group(1) if m else f.split("(")[0][:40]


def main():
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25
    threads = collections.defaultdict(lambda: {"n": 0, "self": collections.Counter(),
                                               "incl": collections.Counter(), "crate": collections.Counter()})
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        # Threads named by id or by a name with a per-process suffix fold into one name.
        t = threads[re.sub(r"-\d+$", "", frames[0])]
        c = int(count)
        t["n"] += c
        inner = frames[-1] if len(frames) > 1 else "?"
        t["self"][inner] += c
        t["crate"][crate(inner)] += c
        for f in set(frames[1:]):
            if re.match(r"<?(tuna|burn|cubecl|cubek)", f):
                t["incl"][f] += c
    total = sum(t["n"] for t in threads.values())
    print(f"{total} samples in {len(threads)} threads ({path})")
    for name, t in sorted(threads.items(), key=lambda kv: -kv[1]["n"]):
        if t["n"] < total * 0.02:
            continue
        print(f"\n=== {name}: {t['n']} samples ({100 * t['n'] / total:.0f} %)")
        print("  self time by crate: " + ", ".join(f"{k} {100 * v / t['n']:.0f}%" for k, v in t["crate"].most_common(10)))
        print("  self:")
        for f, v in t["self"].most_common(n):
            print(f"    {100 * v / t['n']:5.1f}%  {f[:160]}")
        print("  inclusive (tuna/burn/cubecl frames):")
        for f, v in t["incl"].most_common(n):
            print(f"    {100 * v / t['n']:5.1f}%  {f[:160]}")


if __name__ == "__main__":
    main()
