"""`edgecad bench`'s report: the tables and plots of a result edgecad.bench measured.

The rows at a fixed target share (run_bench: text or Markdown, and seconds per pass against the floor) and the
rows at equal device memory (run_limits). Nothing here measures; matplotlib is imported only for a plot.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import EdgecadError


def text_table(result: dict) -> str:
    head = f"{'row':<16} {'tok/s':>7} {'min':>6} {'max':>6} {'x tgt-pg':>8} {'x tgt':>6} {'tok/pass':>8} " \
           f"{'peak MB':>8} {'RSS MB':>7} {'MB/tok':>7} {'x floor':>7} {'fidelity':>8} {'ties':>5}  load s (MB read)"
    f = lambda v, fmt, w: f"{'-':>{w}}" if v is None else f"{v:>{w}{fmt}}"
    lines = [head]
    for r in result["rows"]:
        pk = r["peak_resident_target_bytes"]
        bpt = r["bytes_read_per_token"]
        lines.append(f"{r['mode']:<16} {r['tokens_per_second']:>7.2f} {r['tokens_per_second_min']:>6.2f} "
                     f"{r['tokens_per_second_max']:>6.2f} {f(r['speedup_vs_target_paged'], '.2f', 8)} "
                     f"{f(r['speedup_vs_target'], '.2f', 6)} {r['mean_accepted_per_pass']:>8.2f} "
                     f"{f(pk and pk / 1e6, '.0f', 8)} {r['peak_rss_bytes'] / 1e6:>7.0f} {f(bpt and bpt / 1e6, '.1f', 7)} "
                     f"{f(r['floor_multiple'], '.2f', 7)} {r['fidelity']:>8.4f} {r['near_ties']:>5}  {_load(r)}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    f = lambda v, fmt: "–" if v is None else format(v, fmt)
    lines = ["| row | tok/s (min–max) | × target-paged | × target | tok/pass | peak target MB | peak RSS MB "
             "| MB read/tok | × IO floor | fidelity (near-ties) | load s (MB read) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['tokens_per_second']:.2f} ({r['tokens_per_second_min']:.2f}–"
            f"{r['tokens_per_second_max']:.2f}) | {f(r['speedup_vs_target_paged'], '.2f')} | "
            f"{f(r['speedup_vs_target'], '.2f')} | {r['mean_accepted_per_pass']:.2f} | "
            f"{f(r['peak_resident_target_bytes'] and r['peak_resident_target_bytes'] / 1e6, '.0f')} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} | {f(r['bytes_read_per_token'] and r['bytes_read_per_token'] / 1e6, '.1f')} | "
            f"{f(r['floor_multiple'], '.2f')} | {r['fidelity']:.4f} ({r['near_ties']}) | {_load(r)} |")
    return "\n".join(lines)


def pass_table(result: dict) -> str:
    """Seconds per pass, split, against the floor (rows with generating passes)."""
    head = f"{'row':<22} {'s/pass':>7} {'IO wait':>7} {'compute':>7} {'draft':>6} {'rest':>6} {'overlap':>7} " \
           f"{'IO floor':>8} {'cmp floor':>9} {'x floor':>7}"
    lines = [head]
    for r in result["rows"]:
        if r.get("pass_seconds") is None:
            continue
        lines.append(f"{r['mode']:<22} {r['pass_seconds']:>7.3f} {r['pass_io_wait']:>7.3f} {r['pass_compute']:>7.3f} "
                     f"{r['pass_draft']:>6.3f} {r['pass_rest']:>6.3f} {r['pass_overlap']:>7.3f} "
                     f"{r['pass_io_floor']:>8.3f} {r['pass_compute_floor']:>9.3f} {r['pass_floor_multiple']:>7.2f}")
    return "\n".join(lines)


def _load(r: dict) -> str:
    """Load seconds (MB read from storage at load)."""
    mb = "" if r.get("load_bytes_read") is None else f" ({r['load_bytes_read'] / 1e6:,.0f})"
    return f"{r['load_seconds']:.1f}{mb}"


def limits_table(result: dict) -> str:
    lines = ["| device memory | row | tok/s (min–max) | × llama-cpp-python | cgroup peak MB (generating) | "
             "configuration | tok/pass | MB read / pass (network) | load s (MB read) | same text as peer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lim = f"{r['limit_bytes'] / 1e6:,.0f} MB" if r["limit_bytes"] else "no limit"
        if r["tokens_per_second"] is None:
            m = re.search(r"needs ([\d,]+ MB)", r["error"])
            err = f"does not fit (the smallest configuration needs {m.group(1)})" if m else r["error"]
            lines.append(f"| {lim} | {r['row']} | {err} | – | "
                         f"{r['peak_bytes'] / 1e6 if r['peak_bytes'] else 0:,.0f} | – | – | – | – | – |")
            continue
        n = result["config"]["n_prompts"]
        xp = "–" if r["x_peer"] is None else f"{r['x_peer']:.2f}"
        same = "–" if r["same_text_as_peer"] is None else f"{r['same_text_as_peer']}/{n}"
        gen = "–" if not r.get("peak_generating_bytes") else f"{r['peak_generating_bytes'] / 1e6:,.0f}"
        lines.append(
            f"| {lim} | {r['row']} | {r['tokens_per_second']:.2f} ({r['tokens_per_second_min']:.2f}–"
            f"{r['tokens_per_second_max']:.2f}) | {xp} | {(r['peak_bytes'] or 0) / 1e6:,.0f} ({gen}) | {r['config']} | "
            f"{r['tokens_per_pass']:.2f} | {r.get('read_per_pass', 0) / 1e6:,.1f}"
            + (f" ({r['network_per_pass'] / 1e3:,.0f} KB; server peak {r['server_peak_bytes'] / 1e6:,.0f} MB)"
               if r.get("server_peak_bytes") else "") + f" | {_load(r)} | {same} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgecadError("--plot needs matplotlib: pip install 'edgecad[plot]' (or pip install matplotlib)") from None
    return plt


def plot(result: dict, path: str) -> None:
    plt = _pyplot()
    rows = result["rows"]
    names = [r["mode"] for r in rows]
    tps = [r["tokens_per_second"] for r in rows]
    err = [[t - r["tokens_per_second_min"] for t, r in zip(tps, rows)],
           [r["tokens_per_second_max"] - t for t, r in zip(tps, rows)]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    a.bar(names, tps, yerr=err, capsize=4, color="#4c72b0")
    a.set_ylabel("tokens / s (median, min–max)")
    a.set_yscale("log")
    a.set_title("Speed")
    bottom = [0.0] * len(rows)
    for key, label, color in (("seconds_draft", "draft", "#55a868"), ("seconds_target_compute", "target compute",
                                                                       "#4c72b0"), ("seconds_io_wait", "IO wait", "#c44e52")):
        vals = [(r[key] or 0.0) for r in rows]
        b.bar(names, vals, bottom=bottom, label=label, color=color)
        bottom = [x + v for x, v in zip(bottom, vals)]
    b.set_ylabel("seconds per token")
    b.set_title("Where the time goes")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=35)
    c = result["config"]
    fig.suptitle(f"{Path(c['target']).name}, budget {c['budget']}, storage {c['storage']}, "
                 f"{c['n_prompts']} prompts x {c['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_limits(result: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result["config"]["rows"]:
        pts = [(r["limit_bytes"] / 1e6, r["tokens_per_second"]) for r in result["results"]
               if r["row"] == row and r["limit_bytes"] and r["tokens_per_second"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=row)
    ax.set_xlabel("device memory (cgroup limit), MB")
    ax.set_ylabel("tokens / s (median over prompts)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    c = result["config"]
    ax.set_title(f"{Path(c['target']).name}: speed at equal device memory\n"
                 f"{c['n_prompts']} prompts x {c['max_tokens']} greedy tokens, model files dropped from the cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
