"""Memory that moves (edgecad.follow): an engine in a real memory cgroup whose limits the test moves while a
completion streams, on the tiny budget pair (real llama.cpp).

The child streams one completion and waits for the test's word before each next chunk, so the test moves the limit
between two given tokens. It lowers the cgroup's soft limit first (v1 memory.soft_limit_in_bytes, v2 memory.high:
what a manager lowers first, and what the engine follows), then the hard limit to the same value once the engine
moved: a v1 kernel refuses to lower a hard limit under what the cgroup holds (EBUSY), so that write succeeding is
the kernel's word that the engine gave its memory back; a v2 kernel would kill.
"""
import json
import subprocess
import sys
import threading
import time

import pytest

from edgecad import Engine, cgroup
from edgecad.errors import EdgecadError
from edgecad.follow import FollowParams, Watch
from edgecad.gguf_file import read_gguf
from edgecad.measure import margin, memory_room, read_ahead_bytes
from edgecad.plan import Device, plan_memory

MB = 1_000_000
CAN_CGROUP, WHY_NOT = cgroup.available()
needs_cgroup = pytest.mark.skipif(not CAN_CGROUP, reason=f"no memory cgroup: {WHY_NOT}")

CHILD = r"""
import json, sys
from edgecad import Engine
from edgecad.errors import MemoryFloorError
from edgecad.follow import FollowParams
target, draft, n, grow_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
say = lambda **kw: print(json.dumps(kw), flush=True)
hwm = lambda: [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
e = Engine(target, draft, n_ctx=512, follow_memory=FollowParams(interval=0.0, grow_after=grow_after))
say(ready=e.memory_plan.config, budget=e.memory_plan.budget)
for prompt in ("Once upon a time", "Once upon a time"):   # the second: after the floor, memory back
    moves, peaks = 0, []
    try:
        for ch in e.create_completion(prompt, max_tokens=n, temperature=0, stream=True):
            if "edgecad" in ch:
                st = ch["edgecad"]
                say(done=st["token_ids"], moves=st["moves"], config=st["config"], peaks=peaks)
                break
            if len(e.moves) > moves:  # a move came before this token: the peak from here is the new plan's
                moves = len(e.moves)
                peaks.append([e.memory_plan.budget, 0])
                open("/proc/self/clear_refs", "w").write("5")  # (resets VmHWM)
            if peaks:
                peaks[-1][1] = hwm()
            say(token=ch["choices"][0]["text"], config=e.memory_plan.config)
            sys.stdin.readline()
    except MemoryFloorError as err:
        say(floor=str(err), rss=[int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0])
        sys.stdin.readline()
"""


def _runtime() -> int:
    rss = subprocess.run([sys.executable, "-c", "import edgecad.engine; from edgecad.measure import process_rss; "
                          "print(process_rss())"], capture_output=True, text=True, check=True)
    return int(rss.stdout)


def _sizes(target, draft) -> dict:
    """The smallest whole-engine budgets (1 MB steps) that run the target resident, and paged, and run anything."""
    t, d, runtime = read_gguf(target), read_gguf(draft), _runtime()
    dev = Device(runtime=runtime, readahead=read_ahead_bytes(target))
    out = {}
    for mb in range(40, 400):
        try:
            plan = plan_memory(mb * MB, t, d, n_ctx=512, n_batch=512, tree_nodes=32, device=dev)
        except EdgecadError:
            continue
        out.setdefault("any", mb * MB)
        out.setdefault("paged" if plan.paged else "resident", mb * MB)
    return out


class Child:
    """The child in its cgroup: its lines as they come, the test's word before each next chunk."""

    def __init__(self, cg, target, draft, n: int, grow_after: float):
        self.p = cg.start([sys.executable, "-c", CHILD, str(target), str(draft), str(n), str(grow_after)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def line(self) -> dict:
        s = self.p.stdout.readline()
        assert s, f"the child ended: rc {self.p.poll()}: {self.p.stderr.read()[-3000:]}"
        return json.loads(s)

    def go(self) -> None:
        self.p.stdin.write("\n")
        self.p.stdin.flush()

    def close(self) -> int:
        try:
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        return self.p.wait(timeout=120)


def _limit_for(budget: int) -> int:
    """The limit whose room (less the margin a budget keeps) is `budget`."""
    return budget + margin(budget) + 1 * MB


def _reference(target, draft, n: int) -> list:
    """The unconstrained target's greedy tokens."""
    with Engine(target, None, mode="target", memory_budget=None, n_ctx=512) as e:
        return e.create_completion("Once upon a time", max_tokens=n, temperature=0)["edgecad"]["token_ids"]


@needs_cgroup
def test_an_engine_moves_down_when_its_limit_falls_and_up_when_it_rises(budget_pair):
    """Lowered under the resident plan mid-completion, the engine moves to a paged plan before the next pass, is
    not killed, holds the new budget (peak RSS after the move) and lets the kernel take the hard limit down too;
    raised again, it moves back up after grow_after; its tokens are the unconstrained target's throughout."""
    draft, target = budget_pair
    sizes, n = _sizes(target, draft), 96
    high = sizes["resident"] + 100 * MB
    low = _limit_for((sizes["paged"] + sizes["resident"]) // 2)
    with cgroup.MemoryCgroup(high, "follow") as cg:
        child = Child(cg, target, draft, n, grow_after=0.5)
        try:
            ready = child.line()
            assert not ready["ready"].endswith("paged"), ready
            configs, got, moved, raised = [], None, None, None
            for i in range(n + 1):
                msg = child.line()
                if "done" in msg:
                    got = msg
                    break
                configs.append(msg["config"])
                if i == 4:
                    cg.set_limits(soft=low)
                elif i > 4 and moved is None and configs[-1].endswith("paged"):
                    moved = i  # (the next pass moved: the tokens of the step before it may come first)
                    cg.set_limits(low, low)  # (v1: EBUSY unless the engine gave its memory back)
                elif moved is not None and i == moved + 3:
                    cg.set_limits(high, high)
                    raised = i
                if raised is not None and configs[-1].endswith("paged"):
                    time.sleep(0.15)  # (the room must stay larger for grow_after)
                child.go()
            assert child.close() == 0 and not cgroup.killed_by_limit(0, cg)
        finally:
            child.p.kill()
    assert got is not None and moved is not None and moved <= 12, configs
    downs = [m for m in got["moves"] if "fell" in m["why"]]
    ups = [m for m in got["moves"] if "rose" in m["why"]]
    assert len(downs) == 1 and len(ups) == 1, got["moves"]
    assert "paged" in downs[0]["to"] and "paged" not in ups[0]["to"], got["moves"]
    assert not configs[-1].endswith("paged"), configs
    assert len(got["peaks"]) == 2
    for budget, peak in got["peaks"]:
        assert 0 < peak <= budget, got["peaks"]
    assert got["done"] == _reference(target, draft, n)


@needs_cgroup
def test_a_flapping_limit_moves_the_engine_down_once(budget_pair):
    """A limit that drops and comes back every 0.4 s for longer than three times grow_after: the engine moves down
    at the first drop and stays down (the room never stays larger for grow_after: the engine reads it at every pass,
    and its passes come faster than the flaps); its tokens are the target's."""
    draft, target = budget_pair
    sizes, n = _sizes(target, draft), 128
    high = sizes["resident"] + 100 * MB
    low = _limit_for((sizes["paged"] + sizes["resident"]) // 2)
    stop = threading.Event()

    def flap(cg):
        while not stop.wait(0.4):
            cg.set_limits(soft=low)
            if stop.wait(0.4):
                break
            cg.set_limits(soft=high)

    with cgroup.MemoryCgroup(high, "follow") as cg:
        child = Child(cg, target, draft, n, grow_after=1.0)
        flapper = threading.Thread(target=flap, args=(cg,), daemon=True)
        try:
            child.line()
            got = None
            for i in range(n + 1):
                msg = child.line()
                if "done" in msg:
                    got = msg
                    break
                if i == 2:
                    cg.set_limits(soft=low)
                    flapper.start()
                    t0 = time.monotonic()
                time.sleep(0.04)
                child.go()
            stop.set()
            assert child.close() == 0
        finally:
            stop.set()
            child.p.kill()
    assert got is not None and time.monotonic() - t0 > 3.0  # (a steady larger room would have moved it up)
    assert ["fell" in m["why"] for m in got["moves"]] == [True], got["moves"]
    assert got["done"] == _reference(target, draft, n)


@needs_cgroup
def test_below_its_floor_the_engine_stops_with_one_line_and_frees_its_memory(budget_pair):
    """A limit under what any plan needs: the completion stops with MemoryFloorError (one line naming what it
    needs and what to do), the engine frees its models (its RSS back near the runtime's); once the limit comes
    back, the same request runs again on the same engine."""
    draft, target = budget_pair
    sizes, n = _sizes(target, draft), 16
    high = sizes["resident"] + 100 * MB
    with cgroup.MemoryCgroup(high, "follow") as cg:
        child = Child(cg, target, draft, n, grow_after=0.5)
        try:
            child.line()
            floor, got = None, None
            for i in range(2 * n + 4):
                msg = child.line()
                if "floor" in msg:
                    floor = msg
                    cg.set_limits(soft=high)
                elif "done" in msg:
                    got = msg
                    break
                elif i == 3:
                    cg.set_limits(soft=sizes["any"] // 2)
                child.go()
            assert child.close() == 0
        finally:
            child.p.kill()
    assert floor is not None, got
    line = floor["floor"]
    assert "\n" not in line and "it needs at least" in line and "raise the limit" in line, line
    assert floor["rss"] < _runtime() + 40 * MB, floor
    assert got is not None and got["done"] == _reference(target, draft, n)


def test_the_watch_reads_the_room_and_keeps_the_ceiling():
    """The Watch's room is memory_room's, under an explicit budget's ceiling; a plan that holds more than the room
    (beyond the margin) is due down at once; a room at the plan's budget asks for nothing."""
    room, why = memory_room()
    assert room > 0 and why
    w = Watch(FollowParams(interval=0.0), None, room, time.monotonic)
    assert w.due(room) is None
    due = w.due(room + 2 * margin(room))
    assert due is not None and due.down and "fell" in due.why
    capped = Watch(FollowParams(interval=0.0), 200 * MB, 200 * MB, time.monotonic)
    assert capped.room() == (200 * MB, "the memory_budget given")
    assert capped.due(400 * MB).down


CHAT_CHILD = r"""
import json, sys
from pathlib import Path
from edgecad import Engine
from edgecad.chat import Conversation
from edgecad.errors import MemoryFloorError
from edgecad.follow import FollowParams
say = lambda **kw: print(json.dumps(kw), flush=True)
e = Engine(sys.argv[1], sys.argv[2], n_ctx=512, follow_memory=FollowParams(interval=0.0))  # (a reading every pass)
conv = Conversation(e, Path(sys.argv[3]), sampling=dict(max_tokens=48, temperature=0))
def on_text(s):
    say(text=s)
    sys.stdin.readline()
try:
    conv.ask("hello the world", on_text)
except MemoryFloorError as err:
    say(floor=str(err))
conv.close()
say(messages=conv.messages)
"""


@needs_cgroup
def test_a_chat_that_meets_the_floor_keeps_its_question_and_the_answer_so_far(budget_pair, tmp_path):
    """The chat's answer stopped by the floor is kept as Ctrl-C keeps it: the question, the answer so far marked
    interrupted, in the conversation and its transcript."""
    draft, target = budget_pair
    sizes = _sizes(target, draft)
    transcript = tmp_path / "chat.jsonl"
    with cgroup.MemoryCgroup(sizes["resident"] + 100 * MB, "follow") as cg:
        p = cg.start([sys.executable, "-c", CHAT_CHILD, str(target), str(draft), str(transcript)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            msgs, texts = [], 0
            for raw in p.stdout:
                msgs.append(json.loads(raw))
                if "text" in msgs[-1]:
                    texts += 1
                    if texts == 2:
                        cg.set_limits(soft=sizes["any"] // 2)
                    p.stdin.write("\n")
                    p.stdin.flush()
            assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
        finally:
            p.kill()
    floor = next(m["floor"] for m in msgs if "floor" in m)
    assert "it needs at least" in floor
    answer = "".join(m["text"] for m in msgs if "text" in m)
    messages = msgs[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == answer != ""
    lines = [json.loads(l) for l in transcript.read_text().splitlines()]
    assert [l.get("role") for l in lines] == ["user", "assistant"] and lines[1].get("interrupted") is True
