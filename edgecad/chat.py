"""`edgecad chat`: an offline terminal chat with an Engine.

A Conversation holds the messages and appends each one to a JSONL transcript as
soon as it is complete (flushed: a crash loses at most the answer being
written). Every turn renders the whole conversation with the model's chat
template; the engine's KV caches keep the longest common prefix, so a turn
decodes only what is new. A conversation longer than the context loses its
oldest turns in the model's view (the engine's context_overflow, "drop_oldest"
by default here; the transcript keeps them), said once; an answer cut by the
context's end says so. The loop reads lines, runs slash commands, streams
answers, and stops an answer on Ctrl-C with the engine still usable.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import EdgecadError, MemoryFloorError, RemoteLostError

HELP = """commands:
  /reset        forget the conversation (the transcript file keeps it)
  /save FILE    write the conversation so far to FILE (JSONL, one message per line)
  /stats        the last answer's statistics
  /help         this help
  /quit         leave (or Ctrl-D); Ctrl-C stops an answer"""


def read_transcript(path: Path) -> list[dict]:
    """Messages of a JSONL transcript ({"role", "content"} per line; a "reset" line starts over)."""
    messages = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EdgecadError(f"cannot read transcript {path}: {e.strerror}: give an existing file to --resume") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a last line cut short by a crash: the messages before it stand
                break
            rec = None
        if not isinstance(rec, dict):
            raise EdgecadError(f"{path}:{n} is not a JSON line: give a transcript written by `edgecad chat`")
        if rec.get("event") == "reset":
            messages = []
        elif rec.get("event") == "withdrawn" and messages and messages[-1]["role"] == "user":
            messages.pop()
        elif rec.get("role") in ("system", "user", "assistant") and isinstance(rec.get("content"), str):
            messages.append({"role": rec["role"], "content": rec["content"]})
    if messages and messages[-1]["role"] == "user":  # a question whose answer was never written (a crash)
        messages.pop()
    return messages


def default_transcript() -> Path:
    """A new transcript file in edgecad's chats directory ($XDG_DATA_HOME or ~/.local/share), named by the time."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "edgecad" / "chats"
    base.mkdir(parents=True, exist_ok=True)
    return base / time.strftime(f"%Y-%m-%d-%H%M%S-{os.getpid()}.jsonl")


class Conversation:
    """Messages, and the transcript file they are appended to as they complete."""

    def __init__(self, engine, transcript: Optional[Path] = None, *, system: Optional[str] = None,
                 resume: bool = False, sampling: Optional[dict] = None):
        self.engine, self.transcript = engine, transcript
        self.sampling = sampling or {}
        self.messages: list[dict] = read_transcript(transcript) if resume and transcript else []
        self.last_stats: Optional[dict] = None
        self.last_finish: Optional[str] = None  # the last answer's finish_reason
        self.said_dropped = False  # the chat said that the model no longer sees its oldest turns
        self._file = open(transcript, "a", encoding="utf-8") if transcript else None
        if system and not self.messages:
            self._add({"role": "system", "content": system})

    def _write(self, rec: dict) -> None:
        if self._file:
            self._file.write(json.dumps({**rec, "time": round(time.time(), 3)}, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def _add(self, message: dict, **extra) -> None:
        self.messages.append(message)
        self._write({**message, **extra})

    def ask(self, text: str, on_text: Callable[[str], None]) -> str:
        """Add the user's message, stream the answer through on_text, add it; return it. On Ctrl-C the
        answer so far is kept (marked interrupted) and KeyboardInterrupt propagates."""
        parts, interrupted, stream, failed = [], False, None, False
        try:
            self._add({"role": "user", "content": text})
            self.last_finish = None
            stream = self.engine.create_chat_completion(self.messages, stream=True, **self.sampling)
            for chunk in stream:
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    parts.append(delta)
                    on_text(delta)
                if "edgecad" in chunk:
                    self.last_stats = chunk["edgecad"]
                self.last_finish = chunk["choices"][0]["finish_reason"] or self.last_finish
        except (KeyboardInterrupt, MemoryFloorError):  # (the floor: the engine freed its memory; as Ctrl-C)
            interrupted = True
            raise
        except EdgecadError:  # e.g. the conversation no longer fits the context: the question is withdrawn
            failed = True
            raise
        finally:
            if stream is not None:
                stream.close()  # ends the decoder: the engine's caches stay consistent
            answer = "".join(parts)
            if failed and not parts and self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
                self._write({"event": "withdrawn"})
            elif self.messages and self.messages[-1]["role"] == "user":  # an answer follows every question
                self._add({"role": "assistant", "content": answer},
                          **({"interrupted": True} if interrupted or failed else {}))
        return answer

    def notes(self) -> list[str]:
        """What the chat says after the last answer: the first time the model's view left out the oldest turns,
        and an answer the context's end cut."""
        st, n_ctx, out = self.last_stats or {}, self.engine.n_ctx, []
        if st.get("dropped_messages") and not self.said_dropped:
            self.said_dropped = True
            out.append(f"(the conversation outgrew the context of {n_ctx} tokens: the model no longer sees its oldest "
                       "turns; the transcript keeps them)")
        if self.last_finish == "length" and st.get("prompt_tokens", 0) + st.get("n_tokens", 0) >= n_ctx:
            out.append(f"(the answer was cut: it reached the end of the context, {n_ctx} tokens)")
        return out

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.said_dropped = False  # (the new conversation's first drop is said too)
        self._write({"event": "reset"})
        for m in self.messages:
            self._write(m)

    def save(self, path: Path) -> None:
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for m in self.messages:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if self._file and self.transcript and Path(path).resolve() == Path(self.transcript).resolve():
            self._file.close()  # the transcript itself was replaced: append to the new file
            self._file = open(self.transcript, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def sig(v: float, digits: int = 3) -> str:
    """v to `digits` significant digits, never in exponent notation (0.0123, 12.8, 1234)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.{max(digits - 1 - math.floor(math.log10(abs(v))), 0)}f}"


def speeds(st: dict) -> str:
    """A completion's two speeds, labelled: they differ by the time the prompt's passes took."""
    total = st["seconds"] + st["prompt_seconds"]
    with_prompt = st["n_tokens"] / total if total > 0 else 0.0
    return f"{sig(st['tokens_per_second'])} tok/s generating, {sig(with_prompt)} tok/s with the prompt"


def _value(v, in_bytes: bool) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x, in_bytes)}" for k, x in v.items())
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if in_bytes:
        return f"{sig(v / 1e6)} MB"
    return sig(v) if isinstance(v, float) else str(v)


def stats_lines(st: dict) -> list[str]:
    """A completion's `edgecad` statistics for people (/stats, `generate --stats`): floats to 3 significant
    digits, bytes (the *_bytes keys, bytes_read, memory_plan's parts) in MB, tokens_per_second beside the
    speed with the prompt."""
    return [f"{k:>28}: " + (speeds(st) if k == "tokens_per_second" else
                            _value(v, "bytes" in k or k == "memory_plan"))
            for k, v in st.items() if k != "token_ids"]


def stats_line(st: dict) -> str:
    """One line after an answer: speed, tokens per target pass, resident memory."""
    import psutil

    rss = psutil.Process().memory_info().rss
    moves = (st.get("moves_before") or []) + (st.get("moves") or [])
    return (f"{speeds(st)} · {st['mean_accepted_per_pass']:.1f} tokens/pass · {st['prompt_tokens_reused']}/"
            f"{st['prompt_tokens']} prompt tokens reused · {rss / 1e9:.2f} GB resident · {st['config']}"
            + (f" · moved {len(moves)}x, last to {moves[-1]['to']}: {moves[-1]['why']}" if moves else ""))


def plan_line(plan) -> str:
    """The configuration chosen and why, without nested parentheses (plan.reason has its own): `target,
    fastest predicted at 14.2 tok/s (tree 12.8, tree-paged 9.10 tok/s)`."""
    head = f"{plan.config}, fastest predicted at {sig(plan.tokens_per_second)} tok/s"
    others = [f"{c} {sig(v)}" for c, v in plan.alternatives.items() if c != plan.config and not isinstance(v, str)]
    if not others:  # the others do not fit (their alternatives say why)
        return f"{plan.config}, the only configuration that fits ({sig(plan.tokens_per_second)} tok/s predicted)"
    return f"{head} ({', '.join(others)} tok/s)"


def run(conv: Conversation, *, tty: bool, out=sys.stdout, err=sys.stderr, explain=str) -> int:
    """The chat loop over stdin. Returns the exit status. explain: an error as the caller names its arguments
    (the CLI: its flags)."""
    dim = (lambda s: f"\x1b[2m{s}\x1b[0m") if tty else (lambda s: s)
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        err.write(dim("edgecad chat: /help for commands, Ctrl-D to leave") + "\n")
        for m in conv.messages[-6:]:
            if m["role"] != "system":
                err.write(dim(f"[{m['role']}] {m['content']}") + "\n")
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            if tty:
                err.write("\n")
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
            err.write("\n")
            continue
        text = line.strip()
        if text.startswith("/"):
            if _command(conv, text, err, dim) == "quit":
                return 0
        elif text:
            _answer(conv, text, tty, out, err, dim, explain)


def _command(conv: Conversation, text: str, err, dim) -> Optional[str]:
    """A slash command; "quit" when the chat should end."""
    cmd, _, arg = text.partition(" ")
    if cmd in ("/quit", "/exit"):
        return "quit"
    if cmd == "/help":
        err.write(HELP + "\n")
    elif cmd == "/reset":
        conv.reset()
        err.write(dim("conversation reset") + "\n")
    elif cmd == "/save":
        if not arg.strip():
            err.write("usage: /save FILE\n")
            return None
        try:
            conv.save(Path(arg.strip()).expanduser())
            err.write(dim(f"saved {len(conv.messages)} messages to {arg.strip()}") + "\n")
        except OSError as e:
            err.write(f"cannot save to {arg.strip()}: {e.strerror}\n")
    elif cmd == "/stats":
        st = conv.last_stats
        err.write(("no answer yet" if st is None else "\n".join(stats_lines(st))) + "\n")
    else:
        err.write(f"unknown command {cmd}: /help lists them\n")
    return None


def _answer(conv: Conversation, text: str, tty: bool, out, err, dim, explain) -> None:
    """One turn: the answer streamed as it is accepted; Ctrl-C stops it, an error is one line; the chat goes on."""
    def show(s: str) -> None:
        out.write(s)
        out.flush()

    # piped: a blank line ends each answer (an empty one too), so a script can tell where one ends
    end = "\n" if tty else "\n\n"
    try:
        conv.ask(text, show)
        out.write(end)
    except KeyboardInterrupt:
        out.write(end)
        err.write(dim("(stopped)") + "\n")
        return
    except RemoteLostError:  # the engine cannot go on: the chat ends (the transcript has every turn so far)
        out.write(end)
        raise
    except EdgecadError as e:  # one line, and the chat goes on
        out.write(end)
        hint = " (/reset starts a new conversation)" if "context" in str(e) else ""
        err.write(f"edgecad: {explain(str(e))}{hint}\n")
        return
    for note in conv.notes():
        err.write(dim(note) + "\n")
    if tty and conv.last_stats:
        err.write(dim(stats_line(conv.last_stats)) + "\n")
    out.flush()
