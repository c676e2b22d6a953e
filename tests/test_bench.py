"""`edgecad bench --quick`: the JSON schema, and lossless rows faithful to the target (real llama.cpp)."""
import json

import pytest

from edgecad.cli import main

ROW_KEYS = {"mode", "tokens_per_second", "tokens_per_second_min", "tokens_per_second_max", "speedup_vs_target_paged",
            "speedup_vs_target", "mean_accepted_per_pass", "peak_resident_target_bytes", "peak_rss_bytes",
            "bytes_read_per_token", "io_floor_seconds_per_token", "floor_multiple", "fidelity", "near_ties",
            "seconds_draft", "seconds_target_compute", "seconds_io_wait", "seconds_chain", "chain_tokens", "reused_tokens",
            "pager_read_bytes_per_second", "pass_seconds", "pass_io_wait", "pass_compute", "pass_draft", "pass_overlap",
            "pass_rest", "pass_io_floor", "pass_compute_floor", "pass_floor", "pass_floor_multiple"}


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--markdown", "--no-progress", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert set(r) == {"machine", "config", "rows", "speedups"}
    names = [row["mode"] for row in r["rows"]]
    assert names == ["target", "target-paged", "target-prefetch", "linear-paged", "bild-paged", "edgecad-paged",
                     "edgecad-paged-pipeline", "edgecad"]
    for row in r["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["tokens_per_second_min"] <= row["tokens_per_second"] <= row["tokens_per_second_max"]
        # a pass: its parts add up, its floor is the larger of the IO and compute floors (timings: not asserted)
        parts = row["pass_io_wait"] + row["pass_compute"] + row["pass_draft"] + row["pass_rest"]
        assert parts == pytest.approx(row["pass_seconds"]) and row["pass_compute_floor"] > 0
        assert row["pass_floor"] == max(row["pass_io_floor"], row["pass_compute_floor"])
        assert row["pass_floor_multiple"] == pytest.approx(row["pass_seconds"] / row["pass_floor"])
        if row["paged"]:
            assert row["pass_io_floor"] > 0
            assert row["peak_resident_target_bytes"] <= r["config"]["budget_bytes"] * 1.05
            assert row["bytes_read_per_token"] > 0 and row["floor_multiple"] > 0
        else:
            assert row["peak_resident_target_bytes"] is None and row["seconds_io_wait"] is None
        if row["lossless"]:  # lossless rows are the target's greedy choice wherever the choice is clear
            assert row["fidelity"] == 1.0 and row["fidelity_mismatches"] == 0, row
    by = {row["mode"]: row for row in r["rows"]}
    assert by["target"]["mean_accepted_per_pass"] == 1.0
    assert by["edgecad-paged"]["mean_accepted_per_pass"] > by["linear-paged"]["mean_accepted_per_pass"]
    assert by["target-paged"]["speedup_vs_target_paged"] == 1.0
    assert "edgecad-paged/target-paged" in r["speedups"] and "edgecad-paged-pipeline/edgecad-paged" in r["speedups"]
    assert by["edgecad-paged"]["chain_tokens"] == 0  # the row's pipeline off: no drafting beside passes
    assert by["edgecad-paged-pipeline"]["chain_tokens"] > 0  # on: chains drafted beside the passes
    # the tree's point: a pass streams the same layers whatever it verifies, so tokens per pass cut the bytes
    # read per token (the pager's own count, not a definition of the row)
    paged = by["target-paged"]["bytes_read_per_token"]
    assert by["edgecad-paged"]["bytes_read_per_token"] < paged / 1.5, (by["edgecad-paged"], paged)
    assert "| edgecad-paged |" in printed


def test_plot_needs_matplotlib_or_writes_png(tmp_path):
    from edgecad.bench_report import plot
    from edgecad.errors import EdgecadError
    result = {"rows": [{"mode": "target", "tokens_per_second": 2.0, "tokens_per_second_min": 1.5,
                        "tokens_per_second_max": 2.5, "seconds_draft": 0.0, "seconds_target_compute": 0.4,
                        "seconds_io_wait": None}],
              "config": {"target": "t.gguf", "budget": "40%", "storage": "native", "n_prompts": 1, "max_tokens": 8}}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        try:
            plot(result, str(tmp_path / "p.png"))
        except EdgecadError as e:
            assert "pip install" in str(e)
            return
        raise AssertionError("plot without matplotlib must raise EdgecadError")
    plot(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_at_equal_device_memory(tmp_path, capsys):
    """--memory-limit: each row its own process (in a cgroup where one can be made), the peer included."""
    from edgecad import cgroup

    out = tmp_path / "limits.json"
    assert main(["bench", "--quick", "--memory-limit", "400MB", "--modes", "llama-cpp-python", "target-paged", "edgecad",
                 "--json", str(out), "--no-progress", "--threads", "2"]) == 0
    captured = capsys.readouterr()
    r = json.loads(out.read_text())
    ok, why = cgroup.available()
    assert r["config"]["cgroups"] == ok
    if not ok:
        assert why in captured.err
    rows = {x["row"]: x for x in r["results"]}
    assert set(rows) == {"llama-cpp-python", "target-paged", "edgecad"}
    for x in rows.values():
        assert x["returncode"] == 0 and not x["killed"] and x["tokens_per_second"] > 0, x
        # every row gives the target's text (the peer's may run on: llama-cpp-python goes past max_tokens while it
        # holds back a partial UTF-8 character, which this byte-level vocabulary makes often)
        assert all(p.startswith(t) and t for p, t in zip(rows["llama-cpp-python"]["texts"], x["texts"])), x
        if ok:
            assert x["limit_bytes"] == 400_000_000
        if x["row"] != "llama-cpp-python":  # edgecad holds the budget it planned (not the cgroup: the kernel would)
            assert 0 < x["peak_rss_bytes"] <= x["plan"]["budget_bytes"], x
    assert rows["llama-cpp-python"]["x_peer"] == 1.0 and rows["edgecad"]["x_peer"] > 0
    ran = [c["config"] for c in rows["edgecad"]["completions"]]  # (a doubted choice's check may differ: plan.doubt)
    assert ran and set(ran) <= {"target", "target-paged", "tree", "tree-paged"}
    assert rows["edgecad"]["config"] == (" / ".join(ran) if len(set(ran)) > 1 else ran[0])
    assert rows["target-paged"]["plan"]["config"].startswith("target")
    assert "| llama-cpp-python |" in captured.out


def test_bench_rejects_unknown_limit_rows():
    assert main(["bench", "--quick", "--memory-limit", "400MB", "--modes", "nonsense", "--no-progress"]) == 1


def test_dropping_files_says_what_a_mapping_keeps(disk_dir):
    """The bench drops the model files before each row; pages another process maps cannot be dropped, and
    drop_file_cache says how many stay (a row would not start cold: the bench warns)."""
    import mmap
    import os
    import subprocess
    import sys

    from edgecad.cgroup import drop_file_cache
    p = disk_dir / "mapped.bin"
    p.write_bytes(os.urandom(8 << 20))
    with open(p, "rb") as f:
        os.fsync(f.fileno())  # (dirty pages cannot be dropped either)
    assert drop_file_cache([p]) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys\nf = open(sys.argv[1], 'rb')\n"
                               "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nsum(m[::mmap.PAGESIZE])\n"
                               "print('mapped', flush=True)\nsys.stdin.read()", str(p)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert drop_file_cache([p]) >= (8 << 20) - mmap.PAGESIZE  # the other process's pages stay
    finally:
        holder.communicate("", timeout=60)
    assert drop_file_cache([p]) == 0  # nothing maps them: all dropped
