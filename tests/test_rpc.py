"""Remote devices through llama.cpp's RPC backend: a real `edgecad rpc-server` process on loopback, real llama.cpp,
the tiny models. Needs llama-cpp-python built with the RPC backend (scripts/build_rpc.sh): without it these tests
skip, saying so; EDGECAD_TEST_RPC=1 makes its absence a failure (CI sets it after building it)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from edgecad import cgroup, rpc
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgecad rpc-server` in a process of its own, in its own memory cgroup where one can be made."""

    def __init__(self, budget: int = SERVER_BUDGET, extra=()):
        self.port = _free_port()
        ok, self.why_no_cgroup = cgroup.available()
        self.cg = cgroup.MemoryCgroup(budget, "rpc") if ok else None
        cmd = [sys.executable, "-m", "edgecad.cli", "rpc-server", "--port", str(self.port), "--memory-budget",
               str(budget), "--threads", "1", *extra]
        start = self.cg.start if self.cg else subprocess.Popen
        self.p = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ready = self.p.stdout.readline()
        deadline = time.time() + 30
        while time.time() < deadline:  # the listening socket comes after the ready line
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.endpoint = f"127.0.0.1:{self.port}"

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def close(self):
        self.kill()
        if self.cg:
            self.cg.close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


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
        pytest.skip(f"no memory cgroup can be made here ({cgroup.available()[1]}): the budget cannot be measured")
    s = Server(budget=300_000_000)
    try:
        assert _tokens(paging_pair, remote=[s.endpoint]) == _tokens(paging_pair)
        assert s.p.poll() is None and s.cg.oom_kills == 0
        assert 0 < s.cg.peak <= 300_000_000
    finally:
        s.close()


def test_a_server_killed_mid_completion_gives_a_clear_error_and_a_clean_close(paging_pair, server):
    from edgecad.engine import Engine
    draft, target = paging_pair
    e = Engine(target, draft, remote=[server.endpoint], **{**ENGINE, "n_ctx": 2048})
    chunks = 0
    with pytest.raises(RemoteLostError) as err:
        for _ in e.create_completion("The quick brown fox", max_tokens=1500, temperature=0, stream=True):
            chunks += 1
            if chunks == 5:
                server.kill()
    assert 5 <= chunks < 1500 and "remote device was lost" in str(err.value)
    t = time.perf_counter()
    e.close()  # (what uses the lost device is left to the process's exit: freeing it would wait forever)
    assert time.perf_counter() - t < 5


def test_an_unreachable_server_at_load_gives_its_line(paging_pair):
    from edgecad.engine import Engine
    draft, target = paging_pair
    port = _free_port()
    with pytest.raises(RemoteLostError, match=f"127.0.0.1:{port} is unreachable.*rpc-server --port {port}"):
        Engine(target, draft, remote=[f"127.0.0.1:{port}"], **ENGINE)
    with pytest.raises(Exception, match="not host:port"):
        rpc.parse_endpoint("host:port:what")


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
                        str(_free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no authentication" in r.stderr and "--allow-network" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
