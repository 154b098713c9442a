"""Where the GPU idles in a PyTorch training step, from a profiler trace.

`benchmarks/profile_torch.py --trace T.json.gz` writes a Chrome trace of a
few eager training steps, with the step's phases labeled (`step/forward`,
`step/backward`, `step/optimizer`, and `experts/first_projection` at the
experts' first matmul). The host's and the device's events share one clock,
so a stretch in which no kernel, copy or memset runs is time the GPU waited
on the host, and the host phase running at that moment is what it waited
for. This script sums the idle time of each step by phase:

- `forward, before experts`: the layer norm, the router, its plan (only
  small kernels: the device idles while the host issues them),
- `forward, experts on`: from the experts' first projection to the loss,
- `backward`, `optimizer` (Keras' `optimizer.apply`, with its syncs),
- `between steps`: outside the three phases.

    python benchmarks/gpu_timeline.py TRACE.json.gz [TRACE2.json.gz ...]

Device events are the trace's `kernel`, `gpu_memcpy` and `gpu_memset`
events; a trace without them (a CPU run) reports the phases' host times
only.
"""

import argparse
import gzip
import json
import statistics

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
PHASES = ("step/forward", "step/backward", "step/optimizer")
FIRST_PROJECTION = "experts/first_projection"


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _overlap(intervals, start, end):
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in intervals)


def analyze(events):
    """Per step: wall, device busy, and device idle by host phase (all in ms).

    Returns a list of dicts, one per step (a step: one `step/forward`
    range and the `step/backward` and `step/optimizer` ranges after it).
    """
    ranges = {name: [] for name in PHASES + (FIRST_PROJECTION,)}
    device = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if e.get("cat") in DEVICE_CATEGORIES:
            device.append((start, end))
        elif e.get("cat") == "user_annotation" and e.get("name") in ranges:
            ranges[e["name"]].append((start, end))
    for name in ranges:
        ranges[name].sort()
    busy = _union(device)
    forwards = ranges["step/forward"]
    steps = []
    for i, (f_start, f_end) in enumerate(forwards):
        # The step ends where the next one's forward pass starts (the last
        # step: at its optimizer's end).
        later = lambda name: [r for r in ranges[name] if r[0] >= f_end]  # noqa: E731
        backward = later("step/backward")[:1]
        optimizer = later("step/optimizer")[:1]
        if not backward or not optimizer:
            continue
        (b_start, b_end), (o_start, o_end) = backward[0], optimizer[0]
        step_end = forwards[i + 1][0] if i + 1 < len(forwards) else o_end
        firsts = [r[0] for r in ranges[FIRST_PROJECTION] if f_start <= r[0] <= f_end]
        experts_at = min(firsts) if firsts else f_start
        idle = []  # gaps between busy device intervals, inside the step
        cursor = f_start
        for s, e in busy:
            if e <= f_start:
                continue
            if s >= step_end:
                break
            if s > cursor:
                idle.append((cursor, s))
            cursor = max(cursor, e)
        if cursor < step_end:
            idle.append((cursor, step_end))
        windows = {
            "forward, before experts": (f_start, experts_at),
            "forward, experts on": (experts_at, f_end),
            "backward": (b_start, b_end),
            "optimizer": (o_start, o_end),
        }
        row = {
            "wall_ms": (step_end - f_start) / 1e3,
            "device_busy_ms": _overlap(busy, f_start, step_end) / 1e3,
            "host_ms": {name: (end - start) / 1e3 for name, (start, end) in windows.items()},
            "idle_ms": {name: _overlap(idle, start, end) / 1e3 for name, (start, end) in windows.items()},
        }
        inside = sum(row["idle_ms"].values())
        row["idle_ms"]["between steps"] = _overlap(idle, f_start, step_end) / 1e3 - inside
        row["has_device"] = bool(device)
        if not firsts:  # no dropless experts (a dense FFN): one forward row
            for table in (row["host_ms"], row["idle_ms"]):
                table["forward"] = table.pop("forward, before experts") + table.pop(
                    "forward, experts on"
                )
                rest = ("backward", "optimizer", "between steps")
                table.update({name: table.pop(name) for name in rest if name in table})
        steps.append(row)
    return steps


def report(path, steps):
    lines = [f"### {path}", ""]
    if not steps:
        return "\n".join(lines + ["no labeled steps (profile_torch.py --trace labels them)"])
    median = lambda values: statistics.median(values)  # noqa: E731
    wall = median([s["wall_ms"] for s in steps])
    lines.append(f"{len(steps)} steps; median wall {wall:.2f} ms/step (profiled)")
    if steps[0]["has_device"]:
        busy = median([s["device_busy_ms"] for s in steps])
        lines.append(f"device busy {busy:.2f} ms/step, idle {wall - busy:.2f} ms/step")
    lines += ["", "| phase | host ms | device idle ms |", "|---|---|---|"]
    for name in steps[0]["idle_ms"]:
        host = steps[0]["host_ms"].get(name)
        host_ms = "—" if host is None else f"{median([s['host_ms'][name] for s in steps]):.2f}"
        idle = median([s["idle_ms"][name] for s in steps]) if steps[0]["has_device"] else None
        lines.append(f"| {name} | {host_ms} | {'—' if idle is None else f'{idle:.2f}'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+")
    args = p.parse_args(argv)
    for path in args.traces:
        print(report(path, analyze(load(path))))
        print()


if __name__ == "__main__":
    main()
