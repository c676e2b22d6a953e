"""`edgecad chat` under a pseudo-terminal (real llama.cpp on the tiny pair): turns, streaming, Ctrl-C
during an answer, /save, /reset, --resume, piped stdin; and the transcript format."""
import io
import json
import os
import subprocess
import sys

import pytest

from edgecad.chat import read_transcript
from edgecad.errors import EdgecadError

pexpect = pytest.importorskip("pexpect", reason="the chat tests drive a pseudo-terminal with pexpect "
                                                "(pip install 'edgecad[test]')")


def chat_cmd(pair, *extra):
    draft, target = pair
    return [sys.executable, "-m", "edgecad.cli", "chat", "--target", str(target), "--draft", str(draft),
            "--memory-budget", "none", "--temperature", "0", *extra]


def spawn(args, tmp_path):
    """The command in a pseudo-terminal, with an environment of its own (where edgecad comes from passed on)."""
    where = {k: os.environ[k] for k in ("PYTHONPATH", "EDGECAD_NATIVE_LIB") if k in os.environ}
    return pexpect.spawn(args[0], args[1:], cwd=str(tmp_path), encoding="utf-8", timeout=60,
                         env={"XDG_DATA_HOME": str(tmp_path / "data"), "EDGECAD_CACHE": str(tmp_path / "cache"),
                              "PATH": "/usr/bin:/bin", **where})


def quit_chat(p) -> None:
    """/quit, then the chat ends by itself with status 0."""
    p.sendline("/quit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


def test_chat_in_a_terminal(tiny_pair, tmp_path):
    log = tmp_path / "t.jsonl"
    p = spawn(chat_cmd(tiny_pair, "--transcript", str(log), "--n-ctx", "4096", "-n", "12"), tmp_path)
    p.expect(r"ready in [\d.]+ s: \S+, fastest predicted at [\d.]+ tok/s \((\S+ [\d.]+(, )?)+ tok/s\); transcript ")
    p.expect("> ")
    p.sendline("hello there")
    # the answer streamed, then the dim stats line: both speeds, labelled (they differ by the prompt's time)
    p.expect(r"[\d.]+ tok/s generating, [\d.]+ tok/s with the prompt · .* tokens/pass")
    p.expect("> ")
    p.sendline("/save saved.jsonl")
    p.expect("saved 2 messages")
    p.expect("> ")
    p.sendline("/stats")
    p.expect("prompt_tokens_reused")
    p.expect(r"tokens_per_second: [\d.]+ tok/s generating, [\d.]+ tok/s with the prompt\r\n")  # as in the line
    p.expect(r"memory_plan: none\r\n")  # (no budget)
    p.expect(r"bytes_read: [\d.]+ MB\r\n")
    p.expect("> ")
    p.sendline("and again")
    p.expect(r"(\d+)/(\d+) prompt tokens reused")  # turn 2 kept turn 1 in the KV caches
    assert int(p.match.group(1)) > 0
    p.expect("> ")
    p.sendeof()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    msgs = read_transcript(log)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "hello there" and msgs[2]["content"] == "and again"
    assert read_transcript(tmp_path / "saved.jsonl") == msgs[:2]

    # --resume: the conversation continues (shown dimmed), and is appended to the same file
    p = spawn(chat_cmd(tiny_pair, "--resume", str(log), "-n", "8"), tmp_path)
    p.expect(r"\[user\] and again")
    p.expect("> ")
    p.sendline("/reset")
    p.expect("conversation reset")
    quit_chat(p)
    assert read_transcript(log) == []  # the reset is in the transcript


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(paging_pair, tmp_path):
    log = tmp_path / "t.jsonl"
    # a paged target on emulated SD-card storage: answers take seconds, until the end of the context
    p = spawn(chat_cmd(paging_pair, "--transcript", str(log), "--n-ctx", "2048", "-n", "200",
                       "--target-budget", "60%", "--storage", "sd"), tmp_path)
    for attempt in range(3):  # an answer can end by itself (end-of-text) before the interrupt lands
        p.expect("> ")
        p.sendline(f"tell me everything, take {attempt}")
        p.expect_exact(f"take {attempt}\r\n")  # the echo of the line
        p.expect(r"[^\r\n]{4}")  # some of the answer has streamed
        p.sendintr()
        if p.expect([r"\(stopped\)", r"tok/s"]) == 0:
            break
    else:
        pytest.fail("three answers ended before Ctrl-C could stop one")
    p.expect("> ")
    p.sendline("and now?")
    p.expect(r"tok/s")  # the engine still answers after an interrupted answer
    p.expect("> ")
    quit_chat(p)
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    stopped = [l for l in lines if l.get("interrupted")]
    assert len(stopped) == 1 and stopped[0]["role"] == "assistant" and stopped[0]["content"]
    assert lines[-1]["role"] == "assistant" and "interrupted" not in lines[-1]


def test_piped_stdin_has_no_decorations(tiny_pair, tmp_path):
    log = tmp_path / "t.jsonl"
    r = subprocess.run(chat_cmd(tiny_pair, "-n", "6", "--transcript", str(log)), input=b"hello\nhow are you\n",
                       capture_output=True, timeout=120, cwd=tmp_path)  # (bytes: an answer may hold a \r)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert "> " not in out and "tok/s" not in err and "loading" not in err
    # a blank line ends each answer, so a script can tell them apart; the transcript has the answers alone
    answers = [m["content"] for m in read_transcript(log) if m["role"] == "assistant"]
    assert len(answers) == 2 and out == "".join(a + "\n\n" for a in answers)


def test_bad_transcripts(tmp_path):
    f = tmp_path / "t.jsonl"
    pair = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    f.write_text('{"role": "user", "content": "a"}\n{"role": "assistant", "content": "b"}\n{"role": "us')
    assert read_transcript(f) == pair  # cut short by a crash: kept up to it
    f.write_text('{"role": "user", "content": "a"}\n{"role": "assistant", "content": "b"}\n'
                 '{"role": "user", "content": "c"}\n')
    assert read_transcript(f) == pair  # a question never answered is dropped: turns keep alternating
    f.write_text('not json\n{"role": "user", "content": "a"}\n')
    with pytest.raises(EdgecadError, match=r"t.jsonl:1 is not a JSON line"):
        read_transcript(f)
    with pytest.raises(EdgecadError, match="cannot read transcript"):
        read_transcript(tmp_path / "missing.jsonl")


def test_a_full_context_is_one_line_and_the_chat_goes_on(tiny_pair, tmp_path):
    log = tmp_path / "t.jsonl"
    p = spawn(chat_cmd(tiny_pair, "--transcript", str(log), "--n-ctx", "256", "-n", "8"), tmp_path)
    p.expect("> ")
    p.sendline("x" * 600)  # longer than the whole context
    p.expect("edgecad: .*context.*/reset")
    p.expect("> ")
    p.sendline("hi")
    p.expect("tok/s")
    p.expect("> ")
    quit_chat(p)
    assert [m["content"] for m in read_transcript(log) if m["role"] == "user"] == ["hi"]  # the first was withdrawn


def test_a_chat_goes_on_past_its_context_with_its_last_turns(tiny_pair, tmp_path):
    """Twelve turns of ~60 tokens in a context of 256: every turn is answered, the oldest turns are dropped from the
    model's view (said once), and the prompt is the system message and the last turns (the transcript keeps all)."""
    from edgecad import Engine

    log = tmp_path / "t.jsonl"
    p = spawn(chat_cmd(tiny_pair, "--transcript", str(log), "--n-ctx", "256", "-n", "8", "--system", "Be brief."),
              tmp_path)
    p.logfile_read = seen = io.StringIO()
    for i in range(12):
        p.expect("> ")
        p.sendline(f"question {i}: in an inner on the other hand, hello the world")
        if p.expect([r"tok/s generating", r"edgecad: "]) == 1:
            pytest.fail(f"turn {i} failed: {p.readline()}")
    p.expect("> ")
    p.sendline("/stats")
    p.expect(r"prompt_tokens: (\d+)\r\n")
    prompt = int(p.match.group(1))
    p.expect(r"dropped_messages: (\d+)\r\n")
    dropped = int(p.match.group(1))
    p.expect("> ")
    quit_chat(p)
    assert seen.getvalue().count("outgrew the context of 256 tokens") == 1
    msgs = read_transcript(log)
    assert len(msgs) == 25 and dropped > 0 and dropped % 2 == 0
    with Engine(tiny_pair[1], mode="target", n_ctx=256, memory_budget=None) as e:
        kept = msgs[:1] + msgs[1 + dropped:-1]  # the last question's prompt: the system message, the last turns
        assert prompt == len(e.chat_tokens(kept)[0]) and prompt + 8 <= 256


def test_a_reset_chat_says_again_when_it_outgrows_its_context(tiny_target):
    """The drop is said once per conversation: after /reset, the new conversation's first drop is said too."""
    from edgecad import Engine
    from edgecad.chat import Conversation

    with Engine(tiny_target, mode="target", n_ctx=256, memory_budget=None, context_overflow="drop_oldest") as e:
        conv = Conversation(e, system="Be brief.", sampling={"max_tokens": 8, "temperature": 0})
        for _ in range(2):
            said = []
            for i in range(12):
                conv.ask(f"question {i}: in an inner on the other hand, hello the world", lambda s: None)
                said += [n for n in conv.notes() if "outgrew the context of 256 tokens" in n]
            assert len(said) == 1 and conv.last_stats["dropped_messages"] > 0
            conv.reset()


def test_the_context_s_end_cuts_an_answer_and_says_so(tiny_pair, tmp_path):
    """Without -n an answer runs to the end of the context: the chat says it was cut, and the next turn runs."""
    r = subprocess.run(chat_cmd(tiny_pair, "--n-ctx", "256"), input=b"hello\nand then\n", capture_output=True,
                       timeout=120, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0 and err.count("the answer was cut: it reached the end of the context, 256 tokens") == 2
    assert "edgecad: " not in err, err  # (the next turn is answered: the tiny models' answers are mostly bytes
    #                                     that are not UTF-8, so their text is short and the chat still fits)


def test_kill_9_in_the_middle_of_an_answer_leaves_a_valid_transcript(paging_pair, tmp_path):
    import signal
    log = tmp_path / "t.jsonl"
    args = chat_cmd(paging_pair, "--transcript", str(log), "--n-ctx", "2048", "-n", "200",
                    "--target-budget", "60%", "--storage", "sd")
    p = spawn(args, tmp_path)
    p.expect("> ")
    p.sendline("first question")
    p.expect(r"tok/s")
    p.expect("> ")
    p.sendline("tell me everything")
    p.expect_exact("everything\r\n")
    p.expect(r"[^\r\n]{4}")  # the answer is streaming
    p.kill(signal.SIGKILL)
    p.close()
    lines = [json.loads(l) for l in log.read_text().splitlines()]  # every line is whole JSON
    assert [l["role"] for l in lines] == ["user", "assistant", "user"]
    assert read_transcript(log) == [{"role": l["role"], "content": l["content"]} for l in lines[:2]]
    p = spawn([*args[:-4], "--resume", str(log)], tmp_path)  # and the chat resumes from it, with its history:
    p.expect("> ")
    p.sendline("/stats")
    p.expect("no answer yet")
    p.expect("> ")
    p.sendline("and then?")
    p.expect("tok/s")
    p.expect("> ")
    p.sendline("/stats")
    p.expect(r"prompt_tokens: (\d+)")
    history = len(b"first question") + len(lines[1]["content"].encode()) + len(b"and then?")
    assert int(p.match.group(1)) >= history / 2  # (a token is at most 2 bytes in the tiny vocabulary)
    p.expect("> ")
    quit_chat(p)


def test_chat_templates_render_in_a_sandbox(disk_dir):
    """A model file whose chat template reaches for Python internals: refused in one line, not run (the
    template renders in llama-cpp-python's sandboxed Jinja2 environment)."""
    from edgecad import Engine, tiny
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    path = tiny.write_model(disk_dir / "hostile-template.gguf", tiny.TinySpec(n_layer=1), chat_template=hostile)
    with Engine(path, n_ctx=256) as e:
        with pytest.raises(EdgecadError, match="chat template refused these messages: .*unsafe") as x:
            e.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2)
    assert "\n" not in str(x.value)
