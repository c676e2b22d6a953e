"""The `edgecad` command: one line and a non-zero status on bad input, never a traceback."""
import subprocess
import sys
import tempfile

import pytest

from edgecad.cli import main


def run(*args, input=None, env=None):
    """The installed command, run from a neutral directory (not the source tree); env: variables to set."""
    import os
    return subprocess.run([sys.executable, "-m", "edgecad.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), input=input, env=None if env is None else {**os.environ, **env},
                          timeout=600)


def test_generate_prints_the_greedy_completion(tiny_target, capsys):
    from edgecad import Engine
    with Engine(tiny_target, n_threads=2) as e:
        expected = e.create_completion("hello", temperature=0.0, max_tokens=16)["choices"][0]["text"]
    assert main(["generate", "--target", str(tiny_target), "-p", "hello", "-n", "16", "--threads", "2", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "tokens_per_second" in err and "target_passes: 16" in err
    assert "follows_memory: true" in err  # (the default: the engine follows the memory it may use)
    assert main(["generate", "--target", str(tiny_target), "-p", "hello", "-n", "16", "--threads", "2", "--stats",
                 "--fixed-plan"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "follows_memory: false" in err and "moves: []" in err


@pytest.mark.parametrize("target,message", [
    ("nosuch", "unknown model 'nosuch'"),
    ("/nonexistent/m.gguf", "model file not found"),
])
def test_bad_input_is_one_line(target, message):
    r = run("generate", "--target", target, "-p", "hi")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("edgecad: error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_vocabulary_mismatch_and_prompt_too_long(tiny_target, other_vocab_model):
    r = run("generate", "--target", tiny_target, "--draft", other_vocab_model, "--mode", "target", "-p", "hi")
    assert r.returncode == 1 and "vocabulary" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("generate", "--target", tiny_target, "--n-ctx", "256", "-p", "z" * 400)
    assert r.returncode == 1 and "context holds 256" in r.stderr and len(r.stderr.splitlines()) == 1


def test_inspect(tiny_target, capsys):
    assert main(["inspect", str(tiny_target)]) == 0
    out = capsys.readouterr().out
    assert "qwen2: 6 layers" in out and "265 tokens" in out and "blk.5" in out and "own output.weight" in out


def test_models_list_and_path(empty_models_dir, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert str(empty_models_dir) in out and "qwen2.5-coder-1.5b" in out and "not fetched" in out
    assert main(["models", "path", "qwen2.5-coder-0.5b"]) == 1
    assert "edgecad models fetch qwen2.5-coder-0.5b" in capsys.readouterr().err


LONG = "hello the world " * 40  # ~500 tokens


@pytest.mark.parametrize("args,message", [
    (["--top-p", "5"], "--top-p 5.0 is out of range: use a value > 0 and <= 1"),
    (["--top-p", "0"], "--top-p 0.0 is out of range"),
    (["--top-k", "-3"], "--top-k -3 is out of range: use an integer >= 0 (0 = off)"),
    (["--temperature", "-1"], "--temperature -1.0 is out of range: use a value >= 0"),
    (["--threads", "0"], "--threads 0 is out of range: use an integer 1..512"),
    (["--threads", "1000"], "--threads 1000 is out of range: use an integer 1..512"),
    (["--n-ctx", "0"], "--n-ctx 0 is out of range: use an integer >= 256"),
    (["--seed", "-7"], "--seed -7 is out of range: use an integer >= 0 (or -1 for a random seed)"),
    (["--memory-budget=-5%"], "cannot read memory budget '-5%'"),
    (["--memory-budget", "lots"], "cannot read memory budget 'lots'"),
    (["--memory-budget", "1MB"], "give a larger --memory-budget or a smaller --n-ctx"),
    (["--target-budget", "1KB"], "give a --target-budget of at least"),
    (["--mode", "tree", "--n-ctx", "256", "-p", LONG], "shorten the prompt or raise --n-ctx above"),
    (["--mode", "target", "-p", ""], "the prompt is empty"),
])
def test_nonsense_values_get_one_line_naming_the_flag(tiny_pair, args, message):
    draft, target = tiny_pair
    r = run("generate", "--target", target, "--draft", draft, "-p", "hello", "-n", "4", *args)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.startswith("edgecad: error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "-p", "hi", "-n", "0"], "argument -n/--max-tokens: 0 is not a token count: use a positive number, "
                                          "or -1"),
    (["generate", "-p", "hi", "-n", "-5"], "-5 is not a token count"),
    (["generate", "-p", "hi", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["generate", "-p", "hi", "--top-p", "high"], "argument --top-p: invalid float value: 'high'"),
    (["bench", "--n-prompts", "0"], "argument --n-prompts: 0 is not a positive integer"),
    (["bench", "--repeat", "-1"], "argument --repeat: -1 is not a positive integer"),
    (["chat", "-n", "0"], "0 is not a token count"),
    (["inspect"], "the following arguments are required: model"),
    (["generate"], "one of the arguments --prompt/-p -f/--file is required"),
    (["generate", "-p", "hi", "-f", "prompt.txt"], "argument -f/--file: not allowed with argument --prompt/-p"),
])
def test_bad_arguments_are_one_line_with_the_help_to_read(args, message):
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--help" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["bench", "--modes", "nonsense"], "unknown bench rows ['nonsense']: choose from target, "),
    (["bench", "--modes", "target,bogus"], "unknown bench rows ['bogus']"),
    (["bench", "--memory-limit", "1GB", "--modes", "bogus"], "unknown rows ['bogus'] for --memory-limit"),
])
def test_unknown_bench_rows(args, message):
    r = run(*args)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_minus_one_tokens_runs_to_the_end_of_the_context(tiny_target):
    r = run("generate", "--target", tiny_target, "--mode", "target", "-p", "hello", "-n", "-1", "--n-ctx", "256",
            "--stats")
    assert r.returncode == 0, r.stderr
    n = int(next(l for l in r.stderr.splitlines() if l.strip().startswith("n_tokens:")).split(":")[1])
    prompt = int(next(l for l in r.stderr.splitlines() if l.strip().startswith("prompt_tokens:")).split(":")[1])
    assert "near_ties" in r.stderr and n > 0 and n + prompt == 256  # (the F32 tiny model never ends early)


def test_inspect_budget_flag(tiny_pair):
    draft, target = tiny_pair
    r = run("inspect", target, "--draft", draft, "--memory-budget", "1GB")
    assert r.returncode == 0 and "configuration" in r.stdout, r.stderr


def test_ctrl_c_while_the_models_load_exits_130(disk_dir):
    """SIGINT once llama.cpp has mapped the target (a 64 MB model whose pinned 90% load from emulated SD-card
    storage, dropped from the page cache first: about a second): exit 130, one line, nothing generated."""
    import os
    import signal
    import time
    from edgecad import tiny
    from edgecad.cgroup import drop_file_cache
    target = disk_dir / "wide-target.gguf"
    if not target.exists():
        tiny.write_model(target, tiny.TinySpec(n_layer=16, n_embd=256, n_ff=1024, seed=3))
    drop_file_cache([target])
    p = subprocess.Popen([sys.executable, "-m", "edgecad.cli", "generate", "--target", str(target), "--mode", "target",
                          "--target-budget", "90%", "--storage", "sd", "-p", "hello", "-n", "50"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    def llama_mapped():  # llama.cpp maps from the data offset (edgecad's own GGUF reader maps from 0)
        return any(str(target) in l and int(l.split()[2], 16) > 0 for l in open(f"/proc/{p.pid}/maps"))

    deadline = time.monotonic() + 60
    while not llama_mapped() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert out == "" and err.strip() == "edgecad: interrupted"


def test_doctor_on_the_tiny_pair(tiny_pair):
    draft, target = tiny_pair
    r = run("doctor", "--target", target, "--draft", draft, "--memory-budget", "1GB")
    assert r.returncode == 0, r.stderr
    keys = [l.split()[0] for l in r.stdout.splitlines() if l and not l.startswith(" ")]
    assert "paging        streamed layers in memory edgecad owns" in r.stdout  # (this llama.cpp's layout checks out)
    assert "signals       a running engine follows available memory" in r.stdout
    assert keys == ["machine", "memory", "signals", "native", "paging", "backends", "placement", "models", "storage", "plan", "expected",
                    "costs"], r.stdout
    assert "GB/s sequential read (measured)" in r.stdout and "measuring the read speed" in r.stderr
    assert "CPU" in r.stdout and "configuration" in r.stdout and "tokens/s" in r.stdout


def test_doctor_shows_and_forgets_the_learnt_costs(tiny_pair, private_cost_cache):
    """doctor lists the costs this device learnt for the pair (each one's value, what it is, what it follows) and
    forgets them: --reset-costs the pair's (the cache keeps the others), --reset-costs all the whole file."""
    from edgecad.gguf_file import read_gguf
    from edgecad.llama import default_threads
    from edgecad.measure import save_costs
    from edgecad.plan import Costs, observe
    draft, target = tiny_pair
    t, d = read_gguf(target), read_gguf(draft)
    compute = 4 * 1e-10 * t.pass_bytes  # 4 timed 1-token passes, the second time on a core a tenth of it
    one_token = {"mode": "target", "target_passes": 5, "prompt_passes": 1, "n_tokens": 5,
                 "target_compute_seconds": compute, "cpu_target_seconds": compute / 10}
    taught = observe(Costs(), {**one_token, "cpu_target_seconds": None}, speculative=False, streamed=0,
                     target_bytes=t.pass_bytes, draft_bytes=0)
    taught = observe(taught, one_token, speculative=False, streamed=0, target_bytes=t.pass_bytes, draft_bytes=0)
    save_costs(taught, t, d, default_threads())
    save_costs(taught, t, None, default_threads())  # the target alone: another entry
    cache = {"EDGECAD_CACHE": str(private_cost_cache)}  # (the test's own: save_costs wrote there)
    doctor = lambda *extra: run("doctor", "--target", target, "--draft", draft, "--memory-budget", "1GB",
                                "--no-measure", *extra, env=cache)
    r = doctor()
    assert r.returncode == 0, r.stderr
    lines = r.stdout[r.stdout.index("\ncosts "):].splitlines()[1:]
    assert "learnt from 2 completions, 1 of them starved of CPU" in lines[0], r.stdout
    costs = {l.split()[0]: l for l in lines[1:]}
    assert list(costs) == ["read_bps", "target_byte_s", "batch_slope", "paged_byte_s", "draft_node_s",
                           "tree_nodes", "tree_tokens"], r.stdout
    assert costs["target_byte_s"].split()[1] == f"{taught.target_byte_s:.4g}", r.stdout
    assert costs["target_byte_s"].endswith("(learnt from 1 observation)") and costs["batch_slope"].endswith("(prior)")

    r = doctor("--reset-costs")
    assert r.returncode == 0, r.stderr
    reset = next(l for l in r.stdout.splitlines() if l.startswith("reset "))
    assert reset.endswith(f"forgot the costs this device learnt for this pair: 1 entry removed from "
                          f"{private_cost_cache / 'costs.json'}"), reset
    assert "learnt from 0 completions" in r.stdout and "observation" not in r.stdout, r.stdout
    import json
    (left,) = json.loads((private_cost_cache / "costs.json").read_text())
    assert "|-|" in left  # the target alone's entry stays
    r = doctor("--reset-costs", "all")
    assert r.returncode == 0 and "forgot every learnt cost: 1 entry removed" in r.stdout, r.stdout + r.stderr
    assert not (private_cost_cache / "costs.json").exists()
    r = doctor("--reset-costs", "all")
    assert r.returncode == 0 and [l.split(None, 1) for l in r.stdout.splitlines() if l.startswith("reset ")] == \
        [["reset", f"nothing learnt to forget in {private_cost_cache / 'costs.json'}"]], r.stdout


def test_gpu_flags_without_a_gpu_are_one_line(tiny_pair):
    from edgecad import devices
    if devices.gpu() is not None:
        pytest.skip(f"this llama.cpp has a GPU ({devices.gpu().name}): the flags are valid here")
    draft, target = tiny_pair
    r = run("generate", "--target", target, "--draft", draft, "-p", "hi", "--draft-gpu-layers", "4")
    assert r.returncode == 1 and "--draft-gpu-layers" in r.stderr and "no GPU" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_version(capsys):
    from importlib.metadata import version
    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as e:
            main([flag])
        assert e.value.code == 0
        assert capsys.readouterr().out == f"edgecad {version('edgecad')} (llama-cpp-python {version('llama-cpp-python')})\n"


def test_the_prompt_from_a_file_or_standard_input(tiny_target, tmp_path):
    def generate(*args, input=None):
        r = run("generate", "--target", tiny_target, "--mode", "target", "-n", "8", "--stats", *args, input=input)
        assert r.returncode == 0, r.stderr
        return r.stdout, next(l for l in r.stderr.splitlines() if "prompt_tokens:" in l)

    expected = generate("-p", "hello the world")
    f = tmp_path / "prompt.txt"
    f.write_text("hello the world\n")  # the file's last newline is not part of the prompt (as llama.cpp's -f)
    assert generate("-f", f) == expected
    assert generate("--file", f) == expected
    assert generate("-p", "-", input="hello the world\n") == expected  # no longer the prompt "-"
    assert generate("-f", "-", input="hello the world") == expected


def test_a_prompt_file_that_cannot_be_read_is_one_line(tiny_target, tmp_path):
    missing = tmp_path / "missing.txt"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00hello")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for f, message in ((missing, f"cannot read prompt file {missing}: No such file or directory: give a readable "
                                 "text file to -f"),
                       (tmp_path, f"cannot read prompt file {tmp_path}: Is a directory"),
                       (binary, f"prompt file {binary} is not UTF-8 text"),
                       (empty, "the prompt is empty")):
        r = run("generate", "--target", tiny_target, "--mode", "target", "-f", f)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert r.stderr.startswith("edgecad: error: ") and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_stats_are_rounded_with_bytes_in_mb_and_both_speeds_labelled(tiny_pair, capsys):
    import re
    draft, target = tiny_pair
    assert main(["generate", "--target", str(target), "--draft", str(draft), "-p", "hello", "-n", "16",
                 "--threads", "2", "--memory-budget", "1GB", "--stats"]) == 0
    stats = dict(l.strip().split(": ", 1) for l in capsys.readouterr().err.splitlines())
    assert re.fullmatch(r"[\d.]+ tok/s generating, [\d.]+ tok/s with the prompt", stats["tokens_per_second"])
    assert stats["budget_bytes"] == "1000 MB" and re.fullmatch(r"[\d.]+ MB", stats["bytes_read"])
    assert re.fullmatch(r"runtime [\d.]+ MB, draft_weights [\d.]+ MB, .*, spare [\d.]+ MB", stats["memory_plan"])
    assert stats["n_tokens"] == "16" and stats["lossless"] == "true"
    for k, v in stats.items():
        if k != "config_reason":  # (the plan's own words)
            for number in re.findall(r"\d+\.\d+", v):
                assert len(number.replace(".", "").lstrip("0")) <= 3, f"{k}: {v}"


def test_models_list_aligns_its_columns_and_says_where_each_model_is(new_user, tiny_target, monkeypatch, capsys):
    import hashlib
    import shutil
    from edgecad import registry
    data = tiny_target.read_bytes()
    sp = registry.ModelSpec(name="tiny-test-with-a-longer-name-than-the-others", filename="tiny-test.gguf",
                            description="a tiny model", packages=(), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(registry.MODELS, sp.name, sp)
    cache = new_user / ".cache" / "edgecad" / "models"  # where an earlier edgecad fetched it
    cache.mkdir(parents=True)
    shutil.copy(tiny_target, cache / sp.filename)
    assert main(["models", "list"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head == f"models directory: {new_user}/.local/share/edgecad/models" and len(rows) == len(registry.MODELS)
    assert len({r.index(" MB") for r in rows}) == 1  # sizes right-aligned, whatever the names' lengths
    assert len({r.index(m.description) for r, m in zip(rows, registry.MODELS.values())}) == 1
    assert rows[-1].endswith(f"  fetched in {cache}") and all(r.endswith("  not fetched") for r in rows[:-1])
    assert len({r.index("not fetched") for r in rows[:-1]} | {rows[-1].index("fetched in")}) == 1
    assert main(["models", "path", sp.name]) == 0 and capsys.readouterr().out == f"{cache / sp.filename}\n"


# ---------------------------------------------------------------------------- issue 33: what a newcomer met

N_CTX_LINE = ("edgecad: error: --n-ctx 64 is out of range: use an integer >= 256 (llama.cpp allocates a context in "
              "blocks of 256 tokens: a smaller one would hold 256 anyway)\n")


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"], ["serve"], ["inspect", "m.gguf"],
                                     ["doctor", "--no-measure"]], ids=lambda c: c[0])
def test_a_context_below_what_llama_cpp_allocates_is_refused_naming_the_minimum(tiny_target, command):
    """--n-ctx 64 used to run with 256 tokens of context (llama.cpp pads every context to a multiple of 256) while
    the help said >= 8: refused before anything loads, one line naming the minimum and why; the help says it."""
    r = run(*command, "--target", tiny_target, "--n-ctx", "64") if command[0] != "inspect" else \
        run(*command, "--n-ctx", "64")
    assert r.returncode == 1 and r.stdout == "" and r.stderr == N_CTX_LINE, r.stderr
    help_text = " ".join(run(command[0], "--help").stdout.split())
    assert ">= 256" in help_text and ">= 8" not in help_text, help_text


@pytest.mark.parametrize("args,flag,n", [
    (["generate", "-p", "hi", "--memory-budget", "500"], "--memory-budget", "500"),
    (["generate", "-p", "hi", "--memory-budget", " 1.5"], "--memory-budget", "1.5"),
    (["generate", "-p", "hi", "--target-budget", "450"], "--target-budget", "450"),
    (["chat", "--memory-budget", "500"], "--memory-budget", "500"),
    (["serve", "--memory-budget", "500"], "--memory-budget", "500"),
    (["doctor", "--no-measure", "--memory-budget", "500"], "--memory-budget", "500"),
    (["inspect", "m.gguf", "--memory-budget", "500"], "--memory-budget", "500"),
    (["rpc-server", "--memory-budget", "500"], "--memory-budget", "500"),
], ids=lambda x: x if isinstance(x, str) else " ".join(x[:1] + x[-2:]))
def test_a_budget_without_a_unit_is_refused_suggesting_units(tiny_target, args, flag, n):
    """`--memory-budget 500` was 500 bytes ("memory budget 0 MB cannot run ..."): a bare number is refused with
    one line suggesting units, before anything loads or listens."""
    extra = ["--target", str(tiny_target)] if args[0] in ("generate", "chat", "serve", "doctor") else []
    r = run(*args, *extra)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"edgecad: error: {flag} {n} has no unit: give a size such as {n}MB or {n}GB (or {n}B if "
                        "you mean bytes)\n"), r.stderr


def test_a_budget_with_a_unit_runs_and_the_api_still_takes_bytes(tiny_target):
    r = run("generate", "--target", tiny_target, "--mode", "target", "-p", "hello", "-n", "4", "--memory-budget",
            "500MB", "--stats")
    assert r.returncode == 0, r.stderr
    assert any(l.split() == ["budget_bytes:", "500", "MB"] for l in r.stderr.splitlines()), r.stderr
    r = run("generate", "--target", tiny_target, "--mode", "target", "-p", "hello", "-n", "4", "--memory-budget",
            "1000000000B", "--stats")
    assert r.returncode == 0 and "budget_bytes: 1000 MB" in r.stderr, r.stderr
    from edgecad.config import resolve
    assert resolve(tiny_target, memory_budget=500_000_000, calibrate=False).plan.budget == 500_000_000


def test_errors_in_doctor_and_chat_name_the_flags(tiny_pair):
    """Errors written for the Python API (`memory_budget`, `n_ctx`) name the command's flags wherever the command
    line prints them: main's one line did, doctor's plan and the chat's in-conversation errors did not."""
    draft, target = tiny_pair
    r = run("doctor", "--target", target, "--draft", draft, "--memory-budget", "1MB", "--no-measure")
    assert r.returncode == 0, r.stderr
    plan = next(l for l in r.stdout.splitlines() if l.startswith("plan "))
    assert "memory budget 1 MB cannot run tiny-target.gguf" in plan, r.stdout
    assert plan.endswith("give a larger --memory-budget or a smaller --n-ctx"), plan
    assert "memory_budget" not in r.stdout and "n_ctx" not in r.stdout, r.stdout
    r = run("chat", "--target", target, "--n-ctx", "256", "-n", "4", input="x" * 600 + "\nhi\n")
    assert r.returncode == 0, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("edgecad: ")]
    assert len(errors) == 1 and "the context holds 256" in errors[0], r.stderr
    assert "raise --n-ctx above" in errors[0] and "n_ctx" not in errors[0].replace("--n-ctx", ""), errors[0]
    assert r.stdout.endswith("\n\n") and len(r.stdout.strip()) > 0  # and the chat went on: "hi" was answered


def test_doctor_with_a_target_path_runs_it_alone_as_generate_does(tiny_target, tmp_path):
    """`doctor --target PATH` paired the file with the registry's default draft (another vocabulary: its plan was
    the vocabulary error, or "not fetched"), where generate and chat run it alone: doctor chooses the draft as
    they do (cli._draft). EDGECAD_MODELS is empty: the old pairing printed "not fetched" here."""
    r = run("doctor", "--target", tiny_target, "--memory-budget", "1GB", "--no-measure",
            env={"EDGECAD_MODELS": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = {l.split()[0]: l for l in r.stdout.splitlines() if l and not l.startswith(" ")}
    assert "no draft (the target alone)" in lines["models"], r.stdout
    assert "configuration target" in lines["plan"] and "vocabulary" not in r.stdout and "fetch" not in r.stdout
    assert lines["expected"].split()[2:3] == ["tokens/s"], r.stdout
    r = run("generate", "--target", tiny_target, "-p", "hello", "-n", "4", "--stats",
            env={"EDGECAD_MODELS": str(tmp_path)})
    assert r.returncode == 0 and "mode: target" in r.stderr, r.stderr  # what generate runs: the target alone
