"""GBNF text checked before llama.cpp sees it (`check`, called by `llama.Grammar`): what llama.cpp's grammar
parser cannot take safely is refused as a RequestError naming `grammar`, whether the text came from a request's
`grammar` or from a JSON schema's conversion.

llama.cpp (0.3.36's) parses a group `( ... )` by recursion, two C++ frames per level, and checks for left
recursion by recursing along rule references, a frame per rule: a deep enough text overflows the thread's stack
(SIGSEGV, llama.cpp issue #26600). A repetition `x{m,n}` is expanded into m copies of x and n-m rules, and n < m
makes that expansion endless. `measure` scans the text as llama.cpp's parser reads it (literals "..." and classes
[...] with their escapes, tokens <...>, comments #...) and counts what the parser would build.

Not bounded here: the time of ambiguous grammars. llama.cpp enumerates every stack a grammar may be in, and its
left-recursion check revisits shared rules: 20 rules `r0 ::= "" | r1 r1`, `r1 ::= "" | r2 r2`, ... take minutes
to set up, doubling with each rule (`scripts/eval_grammar.py --limits` does not try them).
"""
from __future__ import annotations

import re

from .errors import RequestError

# Measured with `python scripts/eval_grammar.py --limits` (llama-cpp-python 0.3.36, x86-64, glibc 2.36): parsing
# `root ::= ((((...("a")...))))` crashes at 18,701-18,750 levels on 8 MiB (the main thread's stack, and a Python
# thread's: threading.stack_size() is 0, glibc's default; ~450 bytes a level) and at 274 on 128 KiB (musl's
# default thread stack); a chain of rules `r0 ::= r1`, `r1 ::= r2`, ... crashes the left-recursion check at
# 65,625 rules on 8 MiB and at 964 on 128 KiB (~128 bytes a rule). llama.cpp parses on a thread of its own with
# an 8 MiB stack (llama.PARSE_STACK), so these bounds hold whatever stack the caller's thread has (a bound safe on
# 128 KiB would be ~64 levels, and llama-cpp-python's JSON-schema converter nests a group per character of a
# string's maxLength: a schema with maxLength 100 would be refused).
MAX_NESTING = 2000  # ~0.9 MiB of the 8 MiB: 1/9 of the crash depth (maxLength 2000 still passes)
MAX_RULES = 16_000  # ~2 MiB for the left-recursion check: 1/4 of the crash depth
# The rules' total size in llama.cpp's elements (8 bytes each), repetitions expanded: memory (a few MB) and time.
# At 50,000 a literal parses in ~10 ms; llama.cpp's clone (once per tree node) scans every element for each entry
# of each stack: 86-120 ms for a stack 2,000 deep (as-deep-a-stack-elements in --limits), 0.1 ms for a shallow one.
MAX_ELEMENTS = 50_000
MAX_LENGTH = 256 * 1024  # characters: the scan below takes ~0.07 s at most on them

_REPEAT_CAP = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD: a larger {m,n} max is unbounded, a larger min refused
_LEXEME = re.compile(r"""
      (?P<skip> (?: [ \t\r\n] | \#[^\r\n]* )+ )         # space, comments
    | "(?P<literal> [^"\\]* (?:\\.[^"\\]*)* )"?         # a literal: an element a character (escapes count more)
    | \[(?P<cls> [^\]\\]* (?:\\.[^\]\\]*)* )\]?         # a character class: likewise
    | (?P<token> !?<[^>]*>? )                           # a token, <name> or <[id]>
    | (?P<defines> [A-Za-z0-9-]+ [ \t]* ::= )           # a rule's definition
    | (?P<ref> [A-Za-z0-9-]+ | \. )                     # a reference, any character
    | (?P<open> \( ) | (?P<close> \) ) | (?P<alt> \| )
    | (?P<rep> [*+?] | \{ [ \t]* (?P<lo> \d+ ) [ \t]* (?: (?P<comma> , ) [ \t]* (?P<hi> \d* ) [ \t]* )? \} )
    | (?P<other> . )                                    # what llama.cpp refuses: it says so itself
""", re.VERBOSE | re.DOTALL)
_OPS = {"*": (0, None), "+": (1, None), "?": (0, 1)}


def measure(text: str) -> tuple[int, int, int]:
    """(deepest nesting of parentheses, rules, elements) that llama.cpp's parser would reach on `text`: upper
    bounds, scanned until one of them passes its limit. A repetition whose maximum is below its minimum raises."""
    deepest = depth = rules = elements = 0
    item = 0  # elements of the last item (literal, class, group, reference...): what a repetition copies
    for m in _LEXEME.finditer(text):
        kind = m.lastgroup
        if kind in ("literal", "cls"):
            item = len(m[kind])
        elif kind in ("token", "ref", "close"):
            item = 1
        elif kind in ("defines", "open", "alt"):
            item, rules, elements = 0, rules + (kind != "alt"), elements + 1  # the rule's end, or the |
        if kind == "open":
            depth += 1
            deepest = max(deepest, depth)
        elif kind == "close":
            depth = max(depth - 1, 0)
        elif kind == "rep":  # x{m,n} -> x copied m times, then n-m rules x'(k) ::= x x'(k-1) | (x* : one rule)
            if m[0] in _OPS:
                lo, hi = _OPS[m[0]]
            else:
                lo = _count(m["lo"])
                hi = _count(m["hi"]) if m["hi"] else None if m["comma"] else lo
            if hi is not None and hi < lo:
                raise RequestError(f"the grammar repeats an item {m[0]} times, fewer at most than at least: "
                                   "llama.cpp would build rules without end", "grammar")
            extra = 1 if hi is None or hi > _REPEAT_CAP else hi - lo
            grown = item * min(lo, _REPEAT_CAP + 1) + (extra > 0)
            rules, elements, item = rules + extra, elements + grown - item + extra * (item + 3), grown
        elif kind in ("literal", "cls", "token", "ref", "close"):
            elements += item
        if deepest > MAX_NESTING or rules > MAX_RULES or elements > MAX_ELEMENTS:  # refused: no need to scan on
            break
    return deepest, rules, elements


def check(text: str) -> None:
    """Raise a RequestError naming `grammar` if llama.cpp cannot take `text` safely (see the bounds above)."""
    if len(text) > MAX_LENGTH:
        raise RequestError(f"the grammar is {len(text)} characters long, more than {MAX_LENGTH}", "grammar")
    if "\0" in text:
        raise RequestError("the grammar holds a NUL character (llama.cpp would read the text before it only)",
                           "grammar")
    deepest, rules, elements = measure(text)
    if deepest > MAX_NESTING:
        raise RequestError(f"the grammar nests parentheses more than {MAX_NESTING} deep: name sub-rules instead "
                           "of nesting groups", "grammar")
    for what, value, bound in (("rules", rules, MAX_RULES), ("grammar elements", elements, MAX_ELEMENTS)):
        if value > bound:
            raise RequestError(f"the grammar makes more than {bound} {what} (once its repetitions are expanded): "
                               "make it smaller, or repeat less", "grammar")


def _count(digits: str) -> int:
    return int(digits) if len(digits) < 10 else 10 ** 10  # int() refuses very long digit strings
