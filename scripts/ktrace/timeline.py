#!/usr/bin/env python3
"""Reads a ktrace CSV (see ktrace.c) of a decode run and prints where a step's time goes.

    timeline.py TRACE.csv [--step N] [--names cupti_driver_cbid.h]

Steps start at each embedding kernel. Prints every step's device span (first kernel to the end of
the last) and the time from its end to the next step's first kernel (the host's share: reading
the logits back, launching the next step), then the kernels of step N (default: the third from
the end) with their start, duration and stream, and, for a trace with driver calls, the host's
driver calls from the end of step N to the start of the next.
"""
import argparse
import csv
import re
from pathlib import Path


def driver_names(header):
    names = {}
    if header and Path(header).exists():
        for line in open(header):
            m = re.match(r"\s*CUPTI_DRIVER_TRACE_CBID_(\w+)\s*=\s*(\d+)", line)
            if m:
                names[int(m.group(2))] = m.group(1)
    return names


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--step", type=int, default=-3)
    p.add_argument("--kernels", action="store_true")
    p.add_argument("--names", default=str(Path.home() / ".cache/flash-moe/cupti/nvidia/cu13/include/cupti_driver_cbid.h"))
    a = p.parse_args()
    names = driver_names(a.names)
    rows = []
    for r in csv.reader(open(a.trace)):
        if len(r) < 5:
            continue
        name = names.get(int(r[4]), f"cbid {r[4]}") if r[0] == "d" else r[4]
        rows.append((int(r[1]), int(r[2]), r[0], int(r[3]), name))
    rows.sort()
    device = [r for r in rows if r[2] != "d"]
    if a.kernels:
        by_name = {}
        for r in device:
            if r[2] == "k":
                by_name.setdefault(r[4], []).append((r[1] - r[0]) / 1e3)
        print("launches   mean us    min us    max us  kernel")
        for name, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
            print(f"{len(d):8d} {sum(d) / len(d):9.2f} {min(d):9.2f} {max(d):9.2f}  {name[:70]}")
        return
    starts = [i for i, r in enumerate(device) if r[2] == "k" and r[4].startswith("embed")]
    if len(starts) < 2:
        raise SystemExit("fewer than two steps (embedding kernels) in the trace")
    spans = []
    for i, j in zip(starts, starts[1:]):
        kernels = [r for r in device[i:j] if r[2] == "k"]
        end = max(r[1] for r in kernels)
        spans.append((device[i][0], end, device[j][0]))
    print("step  device us  to next us")
    for n, (s, e, nxt) in enumerate(spans):
        print(f"{n:4d} {(e - s) / 1e3:10.1f} {(nxt - e) / 1e3:11.1f}")
    s, e, nxt = spans[a.step]
    print(f"\nstep {a.step % len(spans)}: start (us from the step's start), duration, stream, name")
    for r in device:
        if s <= r[0] < nxt:
            print(f"{(r[0] - s) / 1e3:9.2f} {(r[1] - r[0]) / 1e3:8.2f}  s{r[3]:<4d} {r[4][:70]}")
    host = [r for r in rows if r[2] == "d" and e <= r[0] < nxt]
    if host:
        print("\ndriver calls from the step's end to the next step (us from the end, duration)")
        for r in host:
            print(f"{(r[0] - e) / 1e3:9.1f} {(r[1] - r[0]) / 1e3:8.1f}  {r[4]}")


if __name__ == "__main__":
    main()
