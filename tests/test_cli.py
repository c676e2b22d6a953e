"""The `edgecad` command: one line and a non-zero status on bad input, never a traceback."""
import subprocess
import sys
import tempfile

import pytest

from edgecad.cli import main


def run(*args):
    """The installed command, run from a neutral directory (not the source tree)."""
    return subprocess.run([sys.executable, "-m", "edgecad.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())


def test_generate_prints_the_greedy_completion(tiny_target, capsys):
    from edgecad import Engine
    with Engine(tiny_target, n_threads=2) as e:
        expected = e.create_completion("hello", temperature=0.0, max_tokens=16)["choices"][0]["text"]
    assert main(["generate", "--target", str(tiny_target), "-p", "hello", "-n", "16", "--threads", "2", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "tokens_per_second" in err and "target_passes: 16" in err


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
