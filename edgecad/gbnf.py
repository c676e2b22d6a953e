"""GBNF text checked before llama.cpp sees it (`check`, called by `grammar.Grammar`): what llama.cpp's grammar
parser cannot take safely is refused as a RequestError naming `grammar`, whether the text came from a request's
`grammar` or from a JSON schema's conversion.

llama.cpp (0.3.36's) parses a group `( ... )` by recursion, two C++ frames per level, and checks for left
recursion by recursing along rule references, a frame per rule: a deep enough text overflows the thread's stack
(SIGSEGV, llama.cpp issue #26600). A repetition `x{m,n}` is expanded into m copies of x and n-m rules, and n < m
makes that expansion endless. `measure` scans the text as llama.cpp's parser reads it (literals "..." and classes
[...] with their escapes, tokens <...>, comments #...) and counts what the parser would build.

A JSON schema is bounded before llama-cpp-python's converter writes it as GBNF (`check_schema`, called by
responses.schema_grammar): the converter writes a repetition out in Python, so a count of 10**9 would take
gigabytes before `check` sees the text.

Not bounded here: the time of ambiguous grammars. llama.cpp enumerates every stack a grammar may be in, and its
left-recursion check revisits shared rules: 20 rules `r0 ::= "" | r1 r1`, `r1 ::= "" | r2 r2`, ... take minutes
to set up, doubling with each rule (`scripts/eval_grammar.py --limits` does not try them). Nor the converter's own
time on some schemas: it re-visits an allOf's components each time (the walk bounds that by what it walks), and
looks for a free rule name one by one (thousands of property names that become the same name take seconds).
"""
from __future__ import annotations

import re
from typing import Iterator

from .errors import RequestError

# Measured with `python scripts/eval_grammar.py --limits` (llama-cpp-python 0.3.36, x86-64, glibc 2.36): parsing
# `root ::= ((((...("a")...))))` crashes at 18,701-18,750 levels on 8 MiB (the main thread's stack, and a Python
# thread's: threading.stack_size() is 0, glibc's default; ~450 bytes a level) and at 274 on 128 KiB (musl's
# default thread stack); a chain of rules `r0 ::= r1`, `r1 ::= r2`, ... crashes the left-recursion check at
# 65,625 rules on 8 MiB and at 964 on 128 KiB (~128 bytes a rule). llama.cpp parses on a thread of its own with
# an 8 MiB stack (grammar.PARSE_STACK), so these bounds hold whatever stack the caller's thread has (a bound safe on
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


# ---------------------------------------------------------------------------- JSON schemas

# llama-cpp-python's converter (0.3.36's json_schema_to_gbnf) writes each repetition out: [item] * minItems copies
# (minLength: a copy of its `char` rule per character; a pattern's x{m,n}: m copies), then a nested optional group
# per copy up to the maximum. A count is refused above _REPEAT_CAP, llama.cpp's own cap on a grammar's x{m,n} (a
# grammar cannot repeat more by hand either; maxLength 2000 nests its groups as deep as MAX_NESTING allows).
# minProperties and maxProperties count too, although 0.3.36's converter ignores them (a later one may write them);
# minimum and maximum are not counts (a later converter writes digit ranges, a rule per digit). Every object
# counts, const and enum values too: a $ref may point into them, and the converter visits what it points to.
# Each copy writes its item's rule name, which the converter builds from the names on the way to it (property
# names, "-item", "$defs" names...), so the total written is bounded too: count x (the path's length + 16) summed
# over the schema, at most MAX_SCHEMA_TEXT characters. The path's length (keys such as "properties" included)
# over-counts the name at most ~7 times, so a schema refused for it would write a grammar several times
# MAX_LENGTH, which `check` refuses anyway; within it the converter writes a few MB at most.
MAX_SCHEMA_TEXT = 32 * MAX_LENGTH
# The converter writes an allOf's components' properties again under the allOf's own name each time, a component
# given by $ref too: the walk follows those references (where they lead is walked again, as the converter does).
# It walks at most MAX_SCHEMA_OBJECTS objects and lists, references followed each time (a chain of allOfs that
# each name the next twice would double the walk, and the converter's time, per link): a property's rule alone is
# some 20 characters of grammar, so a grammar within MAX_LENGTH comes from far fewer (~13,000 properties).
MAX_SCHEMA_OBJECTS = 4 * MAX_RULES
# The converter, its reference resolver and json.dumps recurse in Python: up to ~1.5 frames per level of the
# schema's JSON (anyOf: visit, _generate_union_rule and its generator per two levels), under Python's recursion
# limit (1000 by default) with the caller's frames beneath. 128 levels stay under 200 frames (a RecursionError
# deeper would only say so less clearly) and are far deeper than real schemas.
MAX_SCHEMA_DEPTH = 128
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def check_schema(schema, param: str, what: str = "the JSON schema") -> None:
    """Raise a RequestError naming `param` if llama-cpp-python's converter cannot write `schema` safely (see the
    bounds above): one walk, iterative, of its JSON."""
    written = walked = 0  # the copies' estimated characters; objects and lists walked
    # (an object or list, its depth, its path's length, its path: (key, parent) links)
    stack = [(schema, 1, 0, None)] if isinstance(schema, (dict, list, tuple)) else []  # (true, a number...: nothing)
    while stack:
        node, depth, length, path = stack.pop()
        walked += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise RequestError(f"{what} nests more than {MAX_SCHEMA_DEPTH} levels deep (at {_pointer(path)}): "
                               "flatten it", param)
        entries = node.items() if isinstance(node, dict) else enumerate(node)
        stack += [(v, depth + 1, length + len(str(k)) + 1, (k, path))
                  for k, v in entries if isinstance(v, (dict, list, tuple))]
        if not isinstance(node, dict):
            continue
        stack += [(target, depth + 1, length, ("allOf", path)) for target in _components(schema, node)]
        for key, n in _counts(node):
            if not n <= _REPEAT_CAP:  # (NaN too: Python's json reads it)
                raise RequestError(f"{what} repeats {n} times ({key} at {_pointer(path)}): llama.cpp's grammars "
                                   f"repeat at most {_REPEAT_CAP} times, so give {_REPEAT_CAP} or less", param)
            written += max(n, 0) * (8 if key.endswith("Length") else length + 16)  # (a string's copies: `char`)
        if written > MAX_SCHEMA_TEXT or walked > MAX_SCHEMA_OBJECTS:
            raise RequestError(f"{what} is too large for a grammar: "
                               + ("its repetitions (minItems, maxLength...) would write its rules' names (built "
                                  "from its property names) over and over; repeat less, or use shorter names"
                                  if written > MAX_SCHEMA_TEXT else f"over {MAX_SCHEMA_OBJECTS} objects and lists "
                                  "(allOf's references counted each time); make it smaller"), param)


def _counts(node: dict) -> list:
    """(keyword, count) for each repetition a schema object asks for."""
    counts = [(k, node[k]) for k in _COUNTS if isinstance(node.get(k), (int, float))]
    if isinstance(node.get("pattern"), str):
        counts += [("pattern", n) for n in _quantifiers(node["pattern"])]
    return counts


def _components(root, node: dict) -> list:
    """What an allOf's components given by a local $ref ("#/...") lead to, as the converter finds it (those it
    cannot find, it refuses itself); an allOf's anyOf counts its alternatives."""
    out = []
    for c in node.get("allOf") if isinstance(node.get("allOf"), list) else ():
        for part in c.get("anyOf") if isinstance(c, dict) and isinstance(c.get("anyOf"), list) else [c]:
            ref = part.get("$ref") if isinstance(part, dict) else None
            target = root if isinstance(ref, str) and ref.startswith("#/") else None
            for key in ref.split("#")[-1].split("/")[1:] if target is not None else ():
                target = target.get(key) if isinstance(target, dict) else None
            if isinstance(target, (dict, list)):
                out.append(target)
    return out


def _quantifiers(pattern: str) -> Iterator[int]:
    """The counts of a regular expression's x{m}, x{m,} and x{m,n}, read as llama-cpp-python's converter reads
    them (outside escapes and classes [...]; what int() does not read, the converter refuses itself)."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "\\":
            i += 1
        elif pattern[i] == "[":
            while i + 1 < n and pattern[i + 1] != "]":
                i += 2 if pattern[i + 1] == "\\" else 1
        elif pattern[i] == "{" and (end := pattern.find("}", i)) > 0:
            for part in pattern[i + 1:end].split(","):
                try:
                    yield int(part.strip() or 0)
                except ValueError:
                    pass
            i = end
        i += 1


def _pointer(path) -> str:
    """A JSON pointer to a value in the walk above ((key, parent) links), shortened."""
    keys = []
    while path is not None:
        keys.append(str(path[0]))
        path = path[1]
    p = "/" + "/".join(reversed(keys))
    return p if len(p) <= 80 else p[:77] + "..."
