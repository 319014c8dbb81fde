#!/usr/bin/env python3
"""Sums an Nsight Compute CSV (one row per kernel and metric) by kernel name.

    scripts/ncu-summary.py ncu.csv STEPS

prints, per kernel name, launches and microseconds per step (the totals divided by STEPS) and
the time-weighted mean DRAM and SM throughput (% of peak) and registers, largest time first."""
import csv
import sys
from collections import defaultdict

path, steps = sys.argv[1], float(sys.argv[2])
with open(path, newline="") as f:
    lines = [l for l in f if l.startswith('"')]  # ncu prefixes the CSV with its own log lines
kernels = defaultdict(dict)
for row in csv.DictReader(lines):
    value = float(row["Metric Value"].replace(",", ""))
    if row["Metric Unit"] in ("nsecond", "ns"):
        value /= 1e3
    elif row["Metric Unit"] in ("msecond", "ms"):
        value *= 1e3
    kernels[(row["ID"], row["Kernel Name"].split("(")[0])][row["Metric Name"]] = value
by_name = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
for (_, name), m in kernels.items():
    t = m.get("gpu__time_duration.sum", 0.0)
    s = by_name[name]
    s[0] += 1
    s[1] += t
    s[2] += t * m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
    s[3] += t * m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
    s[4] += t * m.get("launch__registers_per_thread", 0.0)
total = sum(s[1] for s in by_name.values())
print(f"{'kernel':<28} {'launches':>9} {'us/step':>9} {'share':>6} {'dram%':>6} {'sm%':>6} {'regs':>5}")
for name, (n, t, d, sm, r) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
    w = t or 1.0
    print(f"{name:<28} {n / steps:9.1f} {t / steps:9.1f} {100 * t / total:5.1f}% {d / w:6.1f} {sm / w:6.1f} {r / w:5.0f}")
print(f"{'all kernels':<28} {sum(s[0] for s in by_name.values()) / steps:9.1f} {total / steps:9.1f}")
