"""The API's arguments, checked: what a completion's llama-cpp-python arguments become, or the one line naming
the argument at fault (a RequestError with its `param`: the server's 400).

The sampling arguments are declared once (SAMPLING: name, JSON type, valid range): the Engine checks them
here into SamplingParams, and the server's request model takes its fields from them (edgecad.server). A new
sampling argument is an entry here (and a SamplingParams field) plus the Engine's two public signatures.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .config import check_int
from .errors import PromptTooLongError, RequestError
from .sampling import SamplingParams


@dataclass(frozen=True)
class Argument:
    """One sampling argument of llama-cpp-python's API."""
    name: str  # its keyword (the Engine's), SamplingParams' field and a request's JSON field
    json: Any  # its type in a request's JSON (the server's field: Optional of it); int, float: what it becomes
    ok: Optional[Callable] = None  # the valid range: a test of float(value) (for an int: of the value as given);
    #                                None: its own check in sampling_params (the vocabulary, a LlamaGrammar)
    valid: str = ""  # that range, as the refusal names it


def _integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# (in the order they are checked: the first one off is named)
SAMPLING = (
    Argument("temperature", float, lambda v: v >= 0, "a value >= 0.0"),
    Argument("top_p", float, lambda v: 0 < v <= 1, "a value > 0 and <= 1"),
    Argument("min_p", float, lambda v: 0 <= v <= 1, "a value >= 0.0 and <= 1.0"),
    Argument("repeat_penalty", float, lambda v: 1e-6 <= v <= 1e6, "a value in 1e-6..1e6 (1.0 = no penalty)"),
    Argument("frequency_penalty", float, lambda v: abs(v) <= 1e6, "a value in -1e6..1e6 (0.0 = none)"),
    Argument("presence_penalty", float, lambda v: abs(v) <= 1e6, "a value in -1e6..1e6 (0.0 = none)"),
    Argument("top_k", int, lambda v: _integer(v) and v >= 0, "an integer >= 0 (0 = off)"),
    Argument("logit_bias", dict[str, float]),  # {token id: bias}: ids within the vocabulary
    Argument("grammar", str),  # GBNF text, or llama-cpp-python's LlamaGrammar
)


def sampling_params(given: dict, n_vocab: int) -> SamplingParams:
    """SamplingParams from llama-cpp-python's arguments (`given`: at least SAMPLING's names, e.g. a public
    method's locals()), with the valid range named when one is off."""
    values = {}
    for a in SAMPLING:
        if a.ok is not None:
            v = given[a.name]
            if not a.ok(v if a.json is int else float(v)):
                raise RequestError(f"{a.name}={v!r} is out of range: use {a.valid}", a.name)
            values[a.name] = a.json(v)
    return SamplingParams(**values, logit_bias=_logit_bias(given["logit_bias"], n_vocab),
                          grammar=_grammar(given["grammar"]))


def _logit_bias(logit_bias: Optional[dict], n_vocab: int) -> tuple:
    bias = {}
    for k, v in (logit_bias or {}).items():  # (OpenAI's JSON gives the token ids as strings; the last one wins)
        if not re.fullmatch(r"-?[0-9]{1,12}", str(k)):  # (not isdigit(): "²" is a digit to Python, not to int)
            raise RequestError(f"logit_bias key {str(k)[:40]!r} is not a token id: use integer token ids "
                               "(as strings in JSON), e.g. {\"1234\": -100}", "logit_bias")
        t = token_ids([int(k)], n_vocab, "logit_bias")[0]
        if not abs(float(v)) <= 1e6:  # (beyond that a bias bans or forces the token: 100 is OpenAI's limit)
            raise RequestError(f"logit_bias for token {t} is {v!r}: use a number in -1e6..1e6", "logit_bias")
        bias[t] = float(v)
    return tuple(bias.items())


def _grammar(grammar) -> Optional[str]:
    if grammar is not None and not isinstance(grammar, str):  # llama-cpp-python's LlamaGrammar
        grammar = getattr(grammar, "_grammar", None)
        if not isinstance(grammar, str):
            raise RequestError("grammar must be GBNF text or a llama_cpp.LlamaGrammar", "grammar")
    return grammar


def token_ids(prompt: Sequence[int], n_vocab: int, param: str = "prompt") -> list[int]:
    """A prompt given as token ids, each checked against the vocabulary (llama.cpp refuses a batch with one
    outside it)."""
    tokens = [int(t) for t in prompt]
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is not in the model's vocabulary: use ids 0..{n_vocab - 1}", param)
    return tokens


def chat_prompt(formatter, messages: Sequence[dict], tools: Optional[list] = None) -> tuple[str, bool, list[str]]:
    """A conversation rendered by the model's chat template (llama-cpp-python's formatter, edgecad.llama), with
    the tools it may call (OpenAI's list; edgecad.tools): the prompt's text, whether it still needs a BOS token,
    and the template's stop strings."""
    try:
        r = formatter(messages=list(messages), tools=tools)
    except Exception as e:  # the template's own checks (roles must alternate, ...): jinja2 raises
        raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from None
    stops = r.stop if isinstance(r.stop, list) else [r.stop] if r.stop else []
    return r.prompt, not r.added_special, [s for s in stops if s]


def text_message(m: dict, i: int) -> dict:
    """A chat message with its content as text: OpenAI's content parts of type "text" joined; other parts
    (images, audio) refused. The server's messages, and those edgecad.tools writes as text itself."""
    if not isinstance(m.get("role"), str):
        raise RequestError(f"messages[{i}] has no role: give each message a \"role\" (system, user, assistant, "
                           "tool)", "messages")
    content = m.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
               for p in content):
            raise RequestError(f"messages[{i}] has a content part that is not text: this model reads text only",
                               "messages")
        m = {**m, "content": "".join(p["text"] for p in content)}
    elif content is not None and not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return m


def completion_length(tokens: list[int], max_tokens: Optional[int], n_ctx: int, param: str = "prompt") -> int:
    """The tokens a completion of this prompt may make: max_tokens, or (None, <= 0) what the context holds.
    param: what the prompt came from (a chat's is its "messages")."""
    if not tokens:
        raise RequestError("the prompt is empty: give at least one character of text", param)
    if len(tokens) >= n_ctx:
        raise PromptTooLongError(
            f"the prompt has {len(tokens)} tokens but the context holds {n_ctx}: "
            f"shorten the {param} or raise n_ctx above {len(tokens)}", param)
    return n_ctx - len(tokens) if max_tokens is None or max_tokens <= 0 else max_tokens


def check_logprobs(name: str, n: Optional[int], echo: bool = False) -> None:
    """The alternatives listed per token (logprobs, top_logprobs): 0..20, and never with the prompt echoed."""
    if n is not None:
        check_int(name, n, 0, 20, "the alternatives listed per token")
        if echo:
            raise RequestError("logprobs with echo=True is not supported: edgecad does not compute the "
                               "prompt's log-probabilities; ask for one of them", "logprobs")


_DEFAULTS = {"suffix": None, "typical_p": 1.0, "logprobs": None, "top_logprobs": None, "echo": False,
             "tfs_z": 1.0, "mirostat_mode": 0}


def unsupported(**given) -> None:
    """Refuse, in one line, an argument of llama-cpp-python's API that edgecad does not implement."""
    for name, value in given.items():
        default = _DEFAULTS.get(name)
        empty = value is None or (isinstance(value, (str, list, dict, tuple)) and not value) or value is False
        if value != default and not (empty and not default):
            raise RequestError(f"{name}={value!r} is not supported by edgecad: leave {name} at its default "
                               f"({default!r})", name)
