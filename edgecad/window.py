"""A chat's prompt: the conversation rendered by the model's chat template, as the tokens the context holds.

The template is the GGUF's own (tokenizer.chat_template) through llama-cpp-python's sandboxed Jinja2 formatter;
a model without one gets ChatML, as llama.cpp does (said once, on stderr): `<|im_start|>role` lines closed by
`<|im_end|>`, which is also the answer's stop string.

A chat that outlives its context (context_overflow="drop_oldest", the terminal chat's way) loses its oldest turns
(a turn: a user message and what follows it up to the next one); the system messages that open it and its last turn
stay. A drop goes on until the prompt and the answer's room take at most KEEP of the context, so the next turns fit
without another drop, and what a call dropped stays dropped while its conversation goes on (a call whose messages
continue the last call's keeps from where that one did): the turns kept stay the prompt's prefix, which both KV
caches hold (Context.sync keeps the longest common prefix), so only a drop decodes the kept turns again.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE

from .errors import RequestError
from .tools import NO_TOOLS, Tools, render

CHATML_END = "<|im_end|>"  # ChatML's end of a turn: the answer's stop string under the default template
OVERFLOW = ("error", "drop_oldest")  # what a chat does when it outgrows the context: refuse, or drop its oldest turns
KEEP = 0.75  # a drop leaves the prompt and the answer's room within this share of the context
ROOM = 0.25  # the room an answer without max_tokens is given when turns are dropped: this share of the context


@dataclass(frozen=True)
class Kept:
    """Where the last chat that could drop turns kept its conversation from."""
    messages: tuple  # that call's conversation, as given
    start: int  # the index of its first message in the prompt after the opening system messages


def turn_starts(messages: Sequence[dict]) -> list[int]:
    """Where each turn starts, after the system messages that open the conversation: at its first other message
    and at every user message."""
    head = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    return [i for i in range(head, len(messages)) if i == head or messages[i].get("role") == "user"]


def overflow_policy(overflow: str) -> str:
    """context_overflow, checked."""
    if overflow not in OVERFLOW:
        raise RequestError(f"context_overflow={overflow!r} is not one of {', '.join(map(repr, OVERFLOW))}: use "
                           "'error' (refuse a chat longer than the context) or 'drop_oldest'", "context_overflow")
    return overflow


class ChatWindow:
    """A chat's prompt tokens for one model: its chat template (compiled on first use) and the tokenizer."""

    def __init__(self, model, tokenize: Callable[..., list[int]], n_ctx: int):
        self.model = model  # the target (edgecad.llama.Model): its template, vocabulary and name
        self.tokenize = tokenize  # Engine.tokenize: (text, add_bos=, special=, param=) -> token ids
        self.n_ctx = n_ctx  # the context's length in tokens
        self.kept: Optional[Kept] = None  # where the last chat that could drop turns kept from
        self.template = model.chat_template()  # the model's own chat template (tokenizer.chat_template), or None
        self.default_template = self.template is None  # the model has none of its own: ChatML stands in
        self._formatter = None  # the compiled template, once a chat needed it

    def formatter(self):
        """The model's chat template, compiled once; ChatML when the model has none (said once)."""
        if self._formatter is None:
            if self.default_template:
                sys.stderr.write(f"edgecad: {self.model.path.name} has no chat template (tokenizer.chat_template): "
                                 "its chats are rendered as ChatML (<|im_start|>role ... <|im_end|>), as llama.cpp "
                                 "does\n")
            try:
                self._formatter = self.model.chat_formatter(self.template or CHATML_CHAT_TEMPLATE,
                                                            CHATML_END if self.default_template else None)
            except Exception as e:  # jinja2's syntax errors: the model's template is broken, not the messages
                raise RequestError(f"the model's chat template does not compile ({type(e).__name__}: {e}): "
                                   "complete a prompt in the model's own format instead (create_completion, "
                                   "/v1/completions, `edgecad generate`)", "messages") from None
        return self._formatter

    @property
    def chat_format(self) -> str:
        """`Llama.chat_format`'s name for the template in use: the model's own, or ChatML."""
        return "chatml" if self.default_template else "chat_template.default"

    def tokens(self, messages: Sequence[dict], tools: Tools = NO_TOOLS) -> tuple[list[int], list[str]]:
        """The conversation (with the tools it may call: edgecad.tools) as prompt tokens (ending with the
        assistant's turn opened), and the template's stop strings. Under the default template, BOS comes as the
        vocabulary asks (as llama-cpp-python's chatml)."""
        prompt, add_bos, stops = render(self.formatter(), messages, tools)
        return self.tokenize(prompt, add_bos=add_bos or self.default_template, special=True,
                             param="messages"), stops

    def fit(self, messages: Sequence[dict], max_tokens: Optional[int], overflow: str, tools: Tools = NO_TOOLS
            ) -> tuple[list[int], list[str], int]:
        """The prompt's tokens, the template's stop strings and how many messages were dropped: none under
        overflow="error" (a conversation too long is then the completion's error), the oldest turns under
        "drop_oldest" (the module's docstring)."""
        overflow_policy(overflow)
        starts = turn_starts(messages)
        if overflow == "error" or len(starts) < 2:
            return (*self.tokens(messages, tools), 0)
        messages, head = list(messages), starts[0]
        room = max_tokens if max_tokens is not None and max_tokens > 0 else int(ROOM * self.n_ctx)
        last = self.kept
        start = last.start if last is not None and last.start in starts and \
            tuple(messages[:len(last.messages)]) == last.messages else head
        # the candidates: where the prompt may start, from where the last call kept. Dropping turns shortens the
        # prompt, so its need falls candidate by candidate: each choice below is a binary search (a render each
        # step), not a render per turn (a long chat: ~100k turns in a 4 MiB body)
        ks, renders = starts[starts.index(start):], {}

        def need(i: int) -> int:
            if i not in renders:
                renders[i] = self.tokens(messages[:head] + messages[ks[i]:], tools)
            return len(renders[i][0]) + room

        i = 0  # the last call's start while it still fits the context
        if need(0) > self.n_ctx:  # else the first within KEEP, else the first that fits, else the last turn
            i = _first(1, len(ks), lambda i: need(i) <= KEEP * self.n_ctx)
            if i == len(ks):
                i = min(_first(1, len(ks), lambda i: need(i) <= self.n_ctx), len(ks) - 1)
        need(i)
        self.kept = Kept(tuple(messages), ks[i])
        return (*renders[i], ks[i] - head)

    def forget(self) -> None:
        """Forget where the last chat kept from (Engine.reset: the caches hold nothing to keep)."""
        self.kept = None


def _first(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The first i in [lo, hi) for which ok(i), where ok is false then true; hi when there is none."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo
