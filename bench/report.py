"""The report of the benchmark suite: the results dict as the printed table (with each figure's
target and whether it is met), the machine line and the git revision the RESULTS.md section names.

Kept apart so that the table's layout and the targets can be read without the measuring code.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

from procs import ROOT

TARGETS = {
    "single": "≥35k and ≥8x seed",
    "array": "≥300k",
    "drain": "≥200k",
    "backfill": "≥50% of live",
    "fresh": "p99 ≤1.5 s",
    "rss_web": "≤120 MB",
    "rss_worker": "bounded by window",
    "commits": "≤2x",
}


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "ms":
        return f"{v * 1000:.0f} ms"
    if unit == "MB":
        return f"{v:.0f} MB"
    return f"{v:,.0f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def row(
    figure: str,
    streamapp: str = "",
    seed: str = "",
    limit: str = "",
    vs_seed: str = "",
    vs_limit: str = "",
    target: str = "",
    met: str = "",
    notes: str = "",
) -> list[str]:
    """One line of the table, its columns by name."""
    return [figure, streamapp, seed, limit, vs_seed, vs_limit, target, met, notes]


def table(results: dict, args) -> list[list[str]]:
    rows = [["figure", "streamapp", "seed", "limit", "vs seed", "vs limit", "target", "met", "notes"]]
    if "single" in results:
        s, sd, b = results["single"]["streamapp"], results["single"]["seed"], results["single"]["bare"]
        met = s["events"] >= 35_000 and s["events"] >= 8 * sd["events"]
        rows.append(
            row(
                "1. single-event ingest (events/s)",
                fmt(s["events"]),
                fmt(sd["events"]),
                fmt(b["events"]),
                ratio(s["events"], sd["events"]),
                ratio(s["events"], b["events"]),
                TARGETS["single"],
                "yes" if met else "no",
                f"limit: bare aiohttp+msgspec parse; median of {args.rounds} alternating {args.seconds}s wrk "
                f"-t1 -c64 rounds; non-2xx {s['errors']}/{sd['errors']}; rounds s {s['all']} seed {sd['all']}",
            )
        )
        rows.append(
            row(
                "   p50 latency (ms)",
                f"{s['p50']:.2f}",
                f"{sd['p50']:.2f}",
                f"{b['p50']:.2f}",
                notes="of the median round",
            )
        )
        rows.append(row("   p99 latency (ms)", f"{s['p99']:.2f}", f"{sd['p99']:.2f}", f"{b['p99']:.2f}"))
    if "array" in results:
        s, b = results["array"]["streamapp"], results["array"]["bare"]
        rows.append(
            row(
                "2. 100-event arrays (events/s)",
                fmt(s["events"]),
                "n/a",
                fmt(b["events"]),
                "-",
                ratio(s["events"], b["events"]),
                TARGETS["array"],
                "yes" if s["events"] >= 300_000 else "no",
                f"the seed takes one event per request, no arrays; p50 {s['p50']:.1f} ms p99 {s['p99']:.1f} ms; "
                f"rounds {s['all']}",
            )
        )
    if "xadd" in results:
        x = results["xadd"]
        rows.append(
            row(
                "   Redis XADD limit (redis-benchmark, /s)",
                limit=f"{x['P1']:,.0f} / {x['P16']:,.0f}",
                notes="-c64, unpipelined / -P 16, same valkey build and config, one ~80 B event each",
            )
        )
    if "drain" in results:
        d = results["drain"]
        s, raw, sd = d.get("streamapp"), d.get("raw"), d.get("seed")
        runs = "; ".join(
            f"{n}: {r['rows']:,}/{r['backlog']:,} rows in {r['seconds']:.1f}s incl. start-up"
            + (
                f", first commit at {r['first_commit_s']:.1f}s, {fmt(r['steady_rate'])} rows/s after"
                if "steady_rate" in r
                else ""
            )
            + ("" if r["done"] else " (TIMED OUT: rate of what it committed)")
            for n, r in d.items()
        )
        rows.append(
            row(
                "3. worker drain Redis->Iceberg (rows/s)",
                fmt(s and s["rate"]),
                fmt(sd and sd["rate"]),
                "-",
                ratio(s and s["rate"], sd and sd["rate"]),
                "-",
                TARGETS["drain"],
                "yes" if s and s["rate"] >= 200_000 else "no",
                f"every agent in one worker (the raw sinks and the clicks_per_minute aggregate); median of "
                f"{args.drain_rounds} alternating drains each, rounds s {s and s['all']} raw {raw and raw['all']} "
                f"seed {sd and sd['all']}; " + runs,
            )
        )
        if raw:
            rows.append(
                row(
                    "   raw clicks sink alone (--agent clicks)",
                    fmt(raw["rate"]),
                    fmt(sd and sd["rate"]),
                    "-",
                    ratio(raw["rate"], sd and sd["rate"]),
                    "-",
                    TARGETS["drain"],
                    "yes" if raw["rate"] >= 200_000 else "no",
                    "a worker running only the raw clicks sink: the path the target describes",
                )
            )
    if "backfill" in results:
        b = results["backfill"]
        live, back = b.get("live"), b.get("backfill")
        share = back["rate"] / live["rate"] if live and back and live["rate"] else None
        rows.append(
            row(
                "3b. backfill drain, 3 years (rows/s)",
                fmt(back and back["rate"]),
                "",
                "",
                "",
                "",
                TARGETS["backfill"],
                "yes" if share is not None and share >= 0.5 else "no",
                f"{share:.0%} of live; " if share is not None else "",
            )
        )
        for name, r in b.items():
            rows[-1][-1] += (
                f"{name}: {r['rows']:,}/{r['backlog']:,} rows in {r['seconds']:.1f}s incl. start-up"
                + (f", first commit at {r['first_commit_s']:.1f}s" if "first_commit_s" in r else "")
                + ("" if r["done"] else " (TIMED OUT)")
                + f", rounds {r['all']}, VmHWM {r['rss'][0]:.0f} MB, {r['files']:,} files in {r['partitions']:,} "
                f"partitions (at most {r['max_files']} per partition) when the rows were in; "
            )
        rows.append(
            row(
                "   live drain, same worker (rows/s)",
                fmt(live and live["rate"]),
                notes=f"{args.drain:,} events stamped within the last minute vs spread uniformly over 3 years "
                f"(~1,100 days); the raw clicks sink alone; median of {args.drain_rounds} alternating drains each",
            )
        )
    if "fresh" in results:
        f = results["fresh"]
        s, sd = f.get("streamapp"), f.get("seed")
        rows.append(
            row(
                f"4. freshness p50 at {args.fresh_rate:.0f} ev/s (s)",
                fmt(s and s["p50"], "s"),
                fmt(sd and sd["p50"], "s"),
                "-",
                notes=f"POST sent -> row's data file in the table's current snapshot (50 ms poll); "
                f"streamapp STREAMAPP_WINDOW_SECONDS=1; {args.fresh_seconds}s each",
            )
        )
        rows.append(
            row(
                "   freshness p99 (s)",
                fmt(s and s["p99"], "s"),
                fmt(sd and sd["p99"], "s"),
                "-",
                ratio(s and s["p99"], sd and sd["p99"]),
                "",
                TARGETS["fresh"],
                "yes" if s and s["p99"] is not None and s["p99"] <= 1.5 else "no",
                "; ".join(f"{n}: {r['visible']}/{r['sent']} visible, max {fmt(r['max'], 's')}" for n, r in f.items()),
            )
        )
    if "rss_web" in results:
        w = results["rss_web"]
        rows.append(
            row(
                "5. web peak RSS (VmHWM)",
                fmt(w["streamapp"][0], "MB"),
                fmt(w["seed"][0], "MB"),
                "-",
                ratio(w["streamapp"][0], w["seed"][0]),
                "",
                TARGETS["rss_web"],
                "yes" if w["streamapp"][0] <= 120 else "no",
                f"after the ingest rounds; summed over {w['streamapp'][1]}/{w['seed'][1]} processes; "
                f"streamapp's valkey {results['rss_redis_ingest']['streamapp'][0]:.0f} MB",
            )
        )
    if "drain" in results:
        d = results["drain"]
        s, raw, sd = d.get("streamapp"), d.get("raw"), d.get("seed")
        rows.append(
            row(
                "   worker peak RSS (VmHWM)",
                fmt(s and s["rss"][0], "MB"),
                fmt(sd and sd["rss"][0], "MB"),
                "-",
                target=TARGETS["rss_worker"],
                notes=f"highest at the end of a drain of {args.drain:,} events (streamapp: default windows of 50,000; "
                f"raw sink alone {raw and fmt(raw['rss'][0], 'MB')})",
            )
        )
    if "commits" in results:
        c = results["commits"]
        s, sd = c["streamapp"], c["seed"]
        k = min(10, s["n"] // 2)
        for figure, key, notes in (
            (
                f"6. commit latency, commit 1-{k} median (ms)",
                "first",
                f"{args.commit_rows}-row windows, one table, one process",
            ),
            (
                f"   commit {s['n'] - k + 1}-{s['n']} median (ms)",
                "last",
                f"sum of commit times {s['seconds']:.0f}s / {sd['seconds']:.0f}s; the two alternate commit by commit",
            ),
        ):
            rows.append(row(figure, fmt(s[key], "ms"), fmt(sd[key], "ms"), "-", notes=notes))
        if s["n"] >= 10_000:
            met = "yes" if s["ratio"] <= 2 else "no"
        elif s["n"] < 100:
            met = "?"
        else:
            met = "no (extrap.)" if s["at10k"] > 2 * s["first"] else "likely (extrap.)"
        extrapolated = (
            ""
            if s["n"] >= 10_000 or s["n"] < 100
            else (
                f"; only {s['n']} commits (--commits): 10,000th extrapolated {fmt(s['at10k'], 'ms')}/"
                f"{fmt(sd['at10k'], 'ms')} = {s['at10k'] / s['first']:.0f}x/{sd['at10k'] / sd['first']:.0f}x the first"
            )
        )
        rows.append(
            row(
                "   growth, last/first",
                f"{s['ratio']:.2f}x",
                f"{sd['ratio']:.2f}x",
                "-",
                target=TARGETS["commits"],
                met=met,
                notes=f"linear fit: {s['slope'] * 1e6:+.0f}/{sd['slope'] * 1e6:+.0f} ms per 1,000 commits"
                + extrapolated,
            )
        )
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
            + "  "
            + r[-1]
        )
    return "\n".join(lines)


def machine() -> str:
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024**2
    return (
        f"{platform.uname().machine}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "streamapp"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (streamapp/ modified)" if dirty else "")
    except OSError:
        return "?"
