"""The per-case rows `tuna bench matmul` prints to stderr as it goes (one JSON object per case),
keyed by case name; other lines (logs) are skipped. The device scripts read these: they are
there even when a command was stopped before printing its final JSON."""
import json


def rows(path):
    out = {}
    for line in open(path, errors="replace"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "case" in r:
            out[r["case"]] = r
    return out
