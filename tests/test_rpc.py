"""Remote devices through llama.cpp's RPC backend: a real `edgecad rpc-server` process on loopback, real llama.cpp,
the tiny models. Needs llama-cpp-python built with the RPC backend (scripts/build_rpc.sh): without it these tests
skip, saying so; EDGECAD_TEST_RPC=1 makes its absence a failure (CI sets it after building it)."""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from edgecad import cgroup, rpc
from edgecad.rpc.client import probe
from edgecad.rpc.harness import ServerProcess, free_port
from edgecad.errors import RemoteLostError

REQUIRED = os.environ.get("EDGECAD_TEST_RPC") == "1"
if not rpc.available():
    if REQUIRED:
        pytest.fail("EDGECAD_TEST_RPC=1 but this llama.cpp has no RPC backend: run bash scripts/build_rpc.sh",
                    pytrace=False)
    pytest.skip("this llama.cpp has no RPC backend (bash scripts/build_rpc.sh builds it; EDGECAD_TEST_RPC=1 "
                "then runs these tests)", allow_module_level=True)

SERVER_BUDGET = 400_000_000
ENGINE = dict(n_ctx=512, target_budget="50%", mode="tree")


@pytest.fixture
def server():
    with ServerProcess(SERVER_BUDGET, threads=1) as s:  # (in its own memory cgroup where one can be made)
        yield s


def _tokens(paging_pair, **kw) -> list[int]:
    from edgecad.engine import Engine
    draft, target = paging_pair
    with Engine(target, draft, **ENGINE, **kw) as e:
        return e.create_completion("The quick brown fox", max_tokens=24, temperature=0)["edgecad"]["token_ids"]


_ENGINE_SCRIPT = """
import json, sys
from edgecad.engine import Engine
draft, target, endpoint = sys.argv[1:4]
with Engine(target, draft, remote=[endpoint], n_ctx=512, target_budget="50%", mode="tree") as e:
    r = e.create_completion("The quick brown fox", max_tokens=24, temperature=0)
print(json.dumps({"tokens": r["edgecad"]["token_ids"], "plan": e.memory_plan.as_dict()["remote"]}))
"""


def test_greedy_tokens_through_a_remote_device_are_the_single_device_engine_s(paging_pair, server):
    """The server in one memory cgroup, the engine in another: the target's last layers run on the server."""
    single = _tokens(paging_pair)
    ok, why = cgroup.available()
    cg = cgroup.MemoryCgroup(1_000_000_000, "rpc-engine") if ok else None
    try:
        cmd = [sys.executable, "-c", _ENGINE_SCRIPT, *map(str, paging_pair), server.endpoint]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r = cg.run(cmd, timeout=300, **pipes) if cg else subprocess.run(cmd, timeout=300, **pipes)
    finally:
        if cg:
            cg.close()
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == single
    (dev,) = out["plan"]
    assert dev["endpoint"] == server.endpoint and dev["layers"] >= 1  # layers did live there
    assert dev["memory_free"] < SERVER_BUDGET  # what the server announced: its budget less what it holds itself
    assert server.p.poll() is None  # it served, and is still up


def test_the_server_stays_within_its_memory_budget(paging_pair):
    if not cgroup.available()[0]:
        pytest.skip(f"no memory cgroup can be made here ({cgroup.available()[1]}): the budget cannot be held")
    s = ServerProcess(300_000_000, threads=1)
    try:  # (a cgroup holds any process to its limit: what is edgecad's is never being pushed against it)
        assert _tokens(paging_pair, remote=[s.endpoint]) == _tokens(paging_pair)
        hwm = [int(l.split()[1]) * 1024 for l in open(f"/proc/{s.p.pid}/status") if l.startswith("VmHWM:")][0]
        assert s.p.poll() is None and s.cg.oom_kills == 0
        assert s.cg.events.get("max", 0) == 0 and hwm <= 300_000_000, (s.cg.events, hwm)
    finally:
        s.close()


_LOSS_SCRIPT = """
import json, signal, sys, time
from edgecad.engine import Engine
from edgecad.errors import RemoteLostError
draft, target, endpoint, pid, when = sys.argv[1:6]
e = Engine(target, draft, remote=[endpoint], n_ctx=2048, target_budget="50%", mode="tree")
kill = lambda: __import__("os").kill(int(pid), signal.SIGKILL)
out = {"chunks": 0}
if when == "idle":  # the server goes while the engine waits for its next request
    e.create_completion("The quick brown fox", max_tokens=4, temperature=0)
    kill(); time.sleep(1)
    try:
        e.create_completion("again", max_tokens=4)
    except RemoteLostError as err:
        out["again"] = str(err)
else:
    try:
        for _ in e.create_completion("The quick brown fox", max_tokens=1500, temperature=0, stream=True):
            out["chunks"] += 1
            if out["chunks"] == 5:
                kill()
    except RemoteLostError as err:
        out["error"] = str(err)
    try:
        e.create_completion("again", max_tokens=4)
    except RemoteLostError as err:
        out["again"] = str(err)
import threading
th = threading.Thread(target=e.close, daemon=True)  # (what uses the lost device is left to the process's exit:
th.start()                                        # freeing it would wait forever)
th.join(60)
out["closed"] = not th.is_alive()
print(json.dumps(out))
"""


@pytest.mark.parametrize("when", ["mid-completion", "idle"])
def test_a_server_killed_gives_a_clear_error_and_a_close_that_does_not_wait(paging_pair, server, when):
    cmd = [sys.executable, "-c", _LOSS_SCRIPT, *map(str, paging_pair), server.endpoint, str(server.p.pid), when]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["closed"], "close waited on the lost server"
    assert "remote device was lost" in out["again"], out  # the next completion says so at once
    if when == "mid-completion":
        assert 5 <= out["chunks"] < 1500 and "remote device was lost during a pass" in out["error"]


_STOP_SCRIPT = """
import json, os, signal, sys
from edgecad.engine import Engine
from edgecad.errors import RemoteLostError
draft, target, endpoint, pid = sys.argv[1:5]
e = Engine(target, draft, remote=[endpoint], n_ctx=2048, target_budget="50%", mode="tree")
out = {"chunks": 0}
try:
    for _ in e.create_completion("The quick brown fox", max_tokens=1500, temperature=0, stream=True):
        out["chunks"] += 1
        if out["chunks"] == 5:  # the server stops answering; its kernel still holds the connection open
            os.kill(int(pid), signal.SIGSTOP)
            print("stopped", flush=True)
except BaseException as err:  # RemoteLostError after the timeout; RemoteInterrupted after a Ctrl-C
    out["error"], out["types"] = str(err), [c.__name__ for c in type(err).__mro__]
try:
    e.create_completion("again", max_tokens=4)
except RemoteLostError as err:
    out["again"] = str(err)
e.close()  # (what uses the lost device is left to the process's exit)
print(json.dumps(out), flush=True)
"""


def _lines(p: subprocess.Popen) -> "queue.Queue[str]":
    """p's stdout, line by line, read in a thread: a test waits for a line with a deadline instead of for good."""
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(l.strip()) for l in p.stdout] + [q.put(None)], daemon=True).start()
    return q


@pytest.mark.parametrize("end", ["timeout", "ctrl-c"])
def test_a_stopped_server_is_lost_after_the_timeout_or_at_once_on_ctrl_c(paging_pair, server, end):
    """An rpc-server stopped with SIGSTOP mid-completion (its machine's kernel still answers TCP, so neither a reset
    nor keepalive tells): with EDGECAD_RPC_TIMEOUT=3 the pass fails with the lost-device line once its socket has
    had nothing for 3 s; with the default timeout (120 s), a Ctrl-C to the engine's process gives up on the pass
    (after GRACE, 1 s). Either way the engine then refuses with the lost-device line and closes. Each waits with a
    deadline far above what it needs (60 s, half the default timeout: no other way out) and fails on a hang."""
    env = {k: v for k, v in os.environ.items() if k != "EDGECAD_RPC_TIMEOUT"}
    if end == "timeout":
        env["EDGECAD_RPC_TIMEOUT"] = "3"
    cmd = [sys.executable, "-c", _STOP_SCRIPT, *map(str, paging_pair), server.endpoint, str(server.p.pid)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = _lines(p)
        assert lines.get(timeout=240) == "stopped", p.stderr.read()[-3000:]
        if end == "ctrl-c":
            time.sleep(2)  # (the next pass waits on the stopped server by now)
            p.send_signal(signal.SIGINT)
        last = lines.get(timeout=60)  # within the deadline, or this test fails (not its whole run)
        assert p.wait(30) == 0 and last, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
        os.kill(server.p.pid, signal.SIGCONT)
    out = json.loads(last)
    assert "RemoteLostError" in out["types"] and "remote device was lost during a pass" in out["error"], out
    if end == "timeout":
        assert "a server sent nothing for 3 s" in out["error"], out
    else:
        assert "KeyboardInterrupt" in out["types"] and "given up after a Ctrl-C" in out["error"], out
    assert "remote device was lost" in out["again"]  # and it says so again, at once


_CTRL_C_SCRIPT = """
import json, sys
from edgecad.engine import Engine
draft, target, endpoint = sys.argv[1:4]
e = Engine(target, draft, remote=[endpoint], n_ctx=2048, target_budget="50%", mode="tree")
out = {"chunks": 0}
try:
    for _ in e.create_completion("The quick brown fox", max_tokens=1500, temperature=0, stream=True):
        out["chunks"] += 1
        if out["chunks"] == 5:
            print("running", flush=True)
except BaseException as err:
    out["types"] = [c.__name__ for c in type(err).__mro__]
out["again"] = e.create_completion("again", max_tokens=4, temperature=0)["edgecad"]["n_tokens"]
e.close()
print(json.dumps(out), flush=True)
"""


def test_a_ctrl_c_while_a_healthy_server_computes_stops_the_completion_and_keeps_the_engine(paging_pair, server):
    """A Ctrl-C mid-completion with a server that answers: the pass stops within GRACE (llama.cpp's own checks),
    KeyboardInterrupt as without remote devices, and the engine goes on with the same server. (One run in 5-15 of
    this crashed, or found its KV cache inconsistent, before watched started its thread inside its Ctrl-C guard: a
    Ctrl-C landing in Thread.start() let the caller decode again while the interrupted pass still ran.)"""
    cmd = [sys.executable, "-c", _CTRL_C_SCRIPT, *map(str, paging_pair), server.endpoint]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines(p)
        assert lines.get(timeout=240) == "running", p.stderr.read()[-3000:]
        p.send_signal(signal.SIGINT)
        last = lines.get(timeout=120)
        assert p.wait(30) == 0 and last, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    out = json.loads(last)
    assert out["types"][0] == "KeyboardInterrupt" and out["chunks"] < 1500, out  # not RemoteInterrupted
    assert out["again"] == 4


def test_serve_exits_on_the_second_ctrl_c_while_a_pass_waits_on_a_stopped_server(paging_pair, server):
    """`edgecad serve --remote`: a streamed completion whose server is stopped (SIGSTOP) waits in a watched call on
    the server's worker thread, which never sees KeyboardInterrupt; two Ctrl-Cs end the server (exit status 0)
    long before the default timeout would (deadline 60 s of 120)."""
    import httpx
    draft, target = paging_pair
    cmd = [sys.executable, "-m", "edgecad.cli", "serve", "--port", "0", "--threads", "1", "--target", str(target),
           "--draft", str(draft), "--mode", "tree", "--remote", server.endpoint, "--target-budget", "50%",
           "--n-ctx", "2048"]
    env = {k: v for k, v in os.environ.items() if k != "EDGECAD_RPC_TIMEOUT"}
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env)
    log: list[str] = []
    ready, stopped = queue.Queue(), threading.Event()

    def read():
        for line in p.stderr:
            log.append(line)
            if " at http://" in line:
                ready.put(line.split(" at ")[1].split("/v1")[0])
        ready.put(None)

    def stream(url):
        body = {"prompt": "The quick brown fox", "max_tokens": 1500, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 5:
                        os.kill(server.p.pid, signal.SIGSTOP)
                        stopped.set()
        except httpx.HTTPError:
            pass  # (the server went away under the stream)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = ready.get(timeout=240)
        assert url, "".join(log)
        threading.Thread(target=stream, args=(url,), daemon=True).start()
        assert stopped.wait(120), "".join(log)
        time.sleep(2)  # (the next pass waits on the stopped server by now)
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0, "".join(log)
    finally:
        if p.poll() is None:
            p.kill()
        os.kill(server.p.pid, signal.SIGCONT)
    text = "".join(log)
    assert "server stopped" in text, text
    assert "Traceback" not in text, text  # (uvicorn's forced exit cancels the running request: no traceback)


def test_an_unreachable_busy_or_foreign_server_at_load_gives_its_line(paging_pair, server):
    from edgecad.engine import Engine
    draft, target = paging_pair
    port = free_port()
    with pytest.raises(RemoteLostError, match=f"127.0.0.1:{port} is unreachable.*rpc-server --port {port}"):
        Engine(target, draft, remote=[f"127.0.0.1:{port}"], **ENGINE)
    with socket.create_server(("127.0.0.1", 0)) as foreign:  # something else listens there: it closes at once
        import threading
        threading.Thread(target=lambda: foreign.accept()[0].close(), daemon=True).start()
        with pytest.raises(RemoteLostError, match="is not an RPC server of this llama.cpp"):
            probe(f"127.0.0.1:{foreign.getsockname()[1]}")
    with socket.create_connection(("127.0.0.1", server.port)):  # another client holds the server
        time.sleep(0.5)  # (accepted: the server serves it and nothing else)
        with pytest.raises(RemoteLostError, match="did not answer within 2 s.*one engine at a time"):
            probe(server.endpoint, timeout=2)
    for bad in ("host:port:what", "[::1]:50052", "no such host.invalid:50052"):
        with pytest.raises(Exception, match="remote device"):
            rpc.parse_endpoint(bad)


def test_a_chat_whose_server_goes_away_ends_with_one_line_and_keeps_its_transcript(paging_pair, server, tmp_path):
    draft, target = paging_pair
    transcript = tmp_path / "chat.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "edgecad.cli", "chat", "--target", str(target), "--draft", str(draft),
                          "--remote", server.endpoint, "--target-budget", "50%", "--n-ctx", "2048", "-n", "600",
                          "--temperature", "0", "--transcript", str(transcript)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write("first question\n")
    p.stdin.flush()
    first = []
    while (line := p.stdout.readline()) not in ("\n", ""):  # a piped answer ends with a blank line
        first.append(line)
    server.kill()
    out, err = p.communicate("second question\n", timeout=120)
    assert p.returncode == 1
    lines = [l for l in err.splitlines() if l.startswith("edgecad:")]
    assert len(lines) == 1 and "remote device was lost" in lines[0] and f"--resume {transcript}" in lines[0], err
    msgs = [json.loads(l) for l in transcript.read_text().splitlines()]
    assert [m.get("role") for m in msgs if "role" in m][:3] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == "first question" and msgs[1]["content"]


def test_rpc_server_refuses_a_network_address_without_the_flag():
    r = subprocess.run([sys.executable, "-m", "edgecad.cli", "rpc-server", "--host", "0.0.0.0", "--port",
                        str(free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no authentication" in r.stderr and "--allow-network" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
