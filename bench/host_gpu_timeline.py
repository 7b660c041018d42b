#!/usr/bin/env python3
"""Runs a command and samples, every 0.25 s, its process tree's CPU time (user + system, from
/proc) and the GPU's utilization and clock (nvidia-smi): whether a training step is bound by the
host (host cores busy, the GPU idle part of the time) or by the GPU. Writes one line per sample
to stderr, then a summary of the `--tail` seconds up to the last sample with the GPU busy (the
timed steps of `tuna bench train`; what follows is its teardown), with the six busiest threads'
share of a core over that window.

usage: host_gpu_timeline.py [--tail S] -- CMD ...
"""
import os, subprocess, sys, threading, time

args = sys.argv[1:]
tail = 6.0
if args[:1] == ["--tail"]:
    tail, args = float(args[1]), args[2:]
if args[:1] == ["--"]:
    args = args[1:]
tick = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root):
    """User + system seconds of root and its descendants (threads included)."""
    total, kids = 0.0, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(f[1]), []).append((int(pid), (int(f[11]) + int(f[12])) / tick))
    stack = [root]
    own = {}
    for ppid, lst in kids.items():
        for pid, t in lst:
            own[pid] = t
    while stack:
        p = stack.pop()
        total += own.get(p, 0.0)
        stack += [c for c, _ in kids.get(p, [])]
    return total


def thread_cpu_s(root):
    """{(pid, tid): (name, user + system seconds)} for every thread of root's process tree."""
    out, pids, kids = {}, [root], {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(pid))
    while pids:
        p = pids.pop()
        pids += kids.get(p, [])
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                f = open(f"/proc/{p}/task/{tid}/stat").read()
                name = f[f.index("(") + 1:f.rindex(")")]
                v = f.rsplit(")", 1)[1].split()
                out[(p, int(tid))] = (name, (int(v[11]) + int(v[12])) / tick)
            except (OSError, ValueError):
                continue
    return out


gpu = {"util": 0, "sm": 0}


def smi():
    q = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,clocks.sm", "--format=csv,noheader,nounits",
                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
    for line in q.stdout:
        try:
            u, c = [int(x) for x in line.split(",")[:2]]
            gpu.update(util=u, sm=c)
        except ValueError:
            pass


threading.Thread(target=smi, daemon=True).start()
t0 = time.time()
proc = subprocess.Popen(args)
rows, last_t, last_c = [], t0, 0.0
threads = []  # (t, {thread: cpu seconds}) per sample
while proc.poll() is None:
    time.sleep(0.25)
    now, cpu = time.time(), tree_cpu_s(proc.pid)
    if cpu >= last_c:
        rows.append((now - t0, (cpu - last_c) / (now - last_t), gpu["util"], gpu["sm"]))
        threads.append((now - t0, thread_cpu_s(proc.pid)))
    last_t, last_c = now, cpu
for t, c, u, s in rows:
    print(f"t {t:6.2f} s  host cores busy {c:4.2f}  gpu util {u:3d} %  sm {s:4d} MHz", file=sys.stderr)
# The window ends at the last sample with the GPU busy (after it, tuna tears down: frees memory,
# writes its kernel cache); without GPU activity, half a second before exit.
busy = [r[0] for r in rows if r[2] > 0]
end = busy[-1] + 0.5 if busy else (rows[-1][0] if rows else 0)
sel = [r for r in rows if end - tail - 0.5 <= r[0] <= end - 0.5]
if sel:
    n = len(sel)
    # Each thread's share of one core over the same window: is one thread (the one building the
    # step's operations) at 100 %?
    # Threads that live through the window (one that exits inside it is left out).
    win = [(t, th) for t, th in threads if end - tail - 0.5 <= t <= end - 0.5]
    if len(win) >= 2:
        (ta, a), (tb, b) = win[0], win[-1]
        share = sorted(((b[k][1] - a[k][1]) / (tb - ta), k, b[k][0]) for k in b if k in a)[::-1]
        for frac, (pid, tid), name in share[:6]:
            print(f"  thread {name!r} (pid {pid}, tid {tid}): {100 * frac:.0f} % of a core", file=sys.stderr)
    print(f"last {tail:.0f} s: host cores busy {sum(r[1] for r in sel) / n:.2f}, gpu util "
          f"{sum(r[2] for r in sel) / n:.0f} %, sm {sum(r[3] for r in sel) / n:.0f} MHz ({n} samples)", file=sys.stderr)
sys.exit(proc.returncode)
