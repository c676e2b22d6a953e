"""edgecad/gbnf.py: grammars llama.cpp cannot take safely are refused before it sees them (real llama.cpp, the
tiny models); controls in subprocesses show that llama.cpp itself crashes on the same texts."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgecad import Engine
from edgecad.errors import RequestError
from edgecad.gbnf import MAX_ELEMENTS, MAX_NESTING, MAX_RULES, MAX_SCHEMA_DEPTH, measure
from edgecad.grammar import Grammar
from edgecad.llama import Model
from edgecad.responses import response_format_grammar


def nested(n: int, inner: str = '"a"') -> str:
    return "root ::= " + "(" * n + inner + ")" * n


def chain(n: int) -> str:
    """root ::= r0, r0 ::= r1, ...: llama.cpp's left-recursion check recurses along it, one frame a rule."""
    return "root ::= r0\n" + "".join(f"r{i:x} ::= r{i + 1:x}\n" for i in range(n)) + f'r{n:x} ::= "a"\n'


@pytest.fixture(scope="module")
def model(tiny_target):
    with Model(tiny_target) as m:
        yield m


def refused(model, text: str, match: str) -> RequestError:
    with pytest.raises(RequestError, match=match) as e:
        Grammar(model, text)
    assert e.value.param == "grammar" and "\n" not in str(e.value)
    return e.value


def test_only_real_parentheses_count_and_llama_cpp_reads_the_text_alike(model):
    tricky = ('root ::= "((\\"((" [(\\](] <[65]> x # ((((\n'
              'x ::= ("(" | [)] | "\\\\") y  # a comment (\n'
              'y ::= "a"')
    assert measure(tricky)[0] == 1
    Grammar(model, tricky).close()  # llama.cpp parses it: literals, classes, tokens and comments end where ours do
    assert measure(nested(7))[0] == 7
    assert measure("root ::= (a) (b) ((c))\na ::= (((b)))")[0] == 3  # the deepest rule expression, not a sum
    assert measure("root ::= " + "(" * 30)[0] == 30  # unbalanced: llama.cpp recurses before it refuses


def test_repetitions_count_as_llama_cpp_expands_them(model):
    _, rules, elements = measure('root ::= "a"{0,1000000}')  # over 2000: llama.cpp makes it "a"*, one rule
    assert rules == 2 and elements < 20
    assert measure('root ::= "a"{0,2000}')[1] == 2001
    assert measure('root ::= "abcd"{2000}')[2] >= 8000
    assert measure('root ::= ("ab" "cd"){2000}')[2] < 4100  # a group is copied as one reference
    for text in ('root ::= "a"{0,1000000}', 'root ::= "a"{0,2000}', 'root ::= ("ab" "cd"){2000}'):
        Grammar(model, text).close()
    e = refused(model, 'root ::= "a"{5,2}', "fewer at most than at least")  # llama.cpp: rules without end
    assert "{5,2}" in str(e)


@pytest.mark.parametrize("depth", [20_000, MAX_NESTING + 1, MAX_NESTING + 2, MAX_NESTING + 50])
def test_grammars_nested_deeper_than_the_bound_are_refused_in_process(model, depth):
    refused(model, nested(depth), f"nests parentheses more than {MAX_NESTING} deep")


def test_long_rule_chains_huge_repetitions_and_long_texts_are_refused(model):
    refused(model, chain(70_000), "characters long")  # llama.cpp crashes from 65,625 rules (the control below)
    refused(model, chain(MAX_RULES), f"more than {MAX_RULES} rules")
    refused(model, "root ::= " + " ".join(f'("{c}"){{0,2000}}' for c in "abcdefghi"), "grammar elements")
    refused(model, 'root ::= "' + "x" * 30 + '"{2000}', f"more than {MAX_ELEMENTS} grammar elements")
    refused(model, 'root ::= "' + "x" * (MAX_ELEMENTS + 1) + '"', f"more than {MAX_ELEMENTS} grammar elements")
    refused(model, 'root ::= "a"' + " " * 300_000, "characters long")
    refused(model, 'root ::= "a"\0((((', "NUL")


def test_grammars_at_the_bounds_work(tiny_pair, model):
    a = model.tokenize("a", add_special=False)[0]
    repeats = "root ::= " + " ".join(['"a"{0,1999}'] * 6)  # 11,995 rules of 4 elements
    assert measure(chain(MAX_RULES - 2))[1] == MAX_RULES and MAX_ELEMENTS - 3000 < measure(repeats)[2] <= MAX_ELEMENTS
    for text in (chain(MAX_RULES - 2), repeats):
        g = Grammar(model, text)
        assert g.allowed([a, a + 1]).tolist() == [True, False]
        g.close()
    draft, target = tiny_pair
    text = nested(MAX_NESTING, '"x" [a-d]*')
    assert measure(text)[0] == MAX_NESTING
    for mode in ("target", "tree"):
        with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=128, memory_budget=None) as e:
            out = e.create_completion("hello", grammar=text, temperature=0, max_tokens=12)
            assert out["edgecad"]["n_tokens"] == 12 and re.fullmatch("x[a-d]*", out["choices"][0]["text"]), out


def test_json_schemas_go_through_the_same_check(tiny_pair):
    """llama-cpp-python's converter nests a group per group of a pattern and per character of x{0,n}: 600 groups
    around a{0,1500} would nest 2,100 deep."""
    draft, target = tiny_pair
    chat = [{"role": "user", "content": "hi"}]
    with Engine(target, draft, mode="tree", n_ctx=128, memory_budget=None) as e:
        with pytest.raises(RequestError, match="nests parentheses") as err:
            e.create_chat_completion(chat, response_format={"type": "json_object", "schema": {
                "type": "string", "pattern": "^" + "(" * 600 + "a{0,1500}" + ")" * 600 + "$"}})
        assert err.value.param == "response_format"  # (the schema is what the client sent)
        out = e.create_chat_completion(chat, response_format={"type": "json_object", "schema": {
            "type": "string", "maxLength": 100}}, temperature=0, max_tokens=8)
        assert out["choices"][0]["message"]["content"].startswith('"')


def schema_refused(schema, match: str) -> str:
    with pytest.raises(RequestError, match=match) as e:
        response_format_grammar({"type": "json_object", "schema": schema})
    assert e.value.param == "response_format" and "\n" not in str(e.value)
    return str(e.value)


def test_json_schemas_are_bounded_before_the_converter_writes_them(model):
    """llama-cpp-python's converter writes a schema's repetitions out in Python ([item] * minItems, ...): a count
    of 10**9 was gigabytes (MemoryError or the OOM killer) before the grammar's check could refuse the text.
    Counts over llama.cpp's repetition cap, schemas nested too deep and repetitions of long rule names are
    refused before it runs; schemas at the bounds convert and parse."""
    big = 10 ** 9
    for key, schema in [("minLength", {"type": "string"}), ("maxLength", {"type": "string"}),
                        ("minItems", {"type": "array", "items": {"type": "integer"}}), ("maxItems", {"type": "array"}),
                        ("minProperties", {"type": "object"}), ("maxProperties", {"type": "object"})]:
        msg = schema_refused({"type": "object", "properties": {"p": {**schema, key: big}}}, key)
        assert "/properties/p" in msg and "2000" in msg
    for pattern in ("^a{1000000000}$", "^(ab){2,1_000_000_000}$", "^[a-z]{3000,}$"):
        schema_refused({"type": "string", "pattern": pattern}, "pattern")
    deep = {"type": "integer"}
    for _ in range(10_000):  # (json.dumps and the converter would raise RecursionError)
        deep = {"type": "array", "items": deep}
    schema_refused(deep, f"more than {MAX_SCHEMA_DEPTH} levels")
    long_names = {"type": "object", "properties": {  # 2,000 copies of a 2,000-character rule name, ten times
        f"{i}{'p' * 2000}": {"type": "array", "items": {"type": "integer"}, "minItems": 2000} for i in range(10)}}
    schema_refused(long_names, "repetitions")
    repeated = {"type": "object", "properties": {f"p{i}": {"allOf": [{"$ref": "#/$defs/D"}]} for i in range(10)},
                "$defs": {"D": {"properties": {"p" * 500: {"type": "array", "items": {}, "minItems": 2000}}}}}
    schema_refused(repeated, "repetitions")  # (the converter writes D's repetitions again for each allOf)
    chain = {f"d{i}": {"properties": {"x": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 4}}} for i in range(12)}
    chain["d12"] = {"properties": {"y": {"type": "integer"}}}  # 4**12 visits: minutes of the converter's time
    schema_refused({"type": "object", "allOf": [{"$ref": "#/$defs/d0"}], "$defs": chain}, "64000 objects")
    for schema in (True, "x", 5):  # (no objects to walk: the converter's own refusal)
        schema_refused(schema, "cannot be turned into a grammar")
    fine = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2000, "maxLength": 2000},
                                             "a": {"type": "array", "items": {"type": "integer"}, "minItems": 2000,
                                                   "maxItems": 2000},
                                             "p": {"type": "string", "pattern": "^a{2000}$"}}}
    deep = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH // 2 - 4):  # (two levels of JSON per level of properties)
        deep = {"type": "object", "properties": {"d": deep}}
    for schema in (fine, deep):
        Grammar(model, response_format_grammar({"type": "json_object", "schema": schema})).close()


def test_bad_grammars_keep_llama_cpp_s_one_line_refusal(model):
    for text in ("root ::= (", 'root ::= root "a" | "b"', 'root ::= x "a"\nx ::= root | "b"', 'x ::= "a"'):
        refused(model, text, "the grammar does not parse")  # left recursion: llama.cpp returns NULL, no abort


CONTROL = """
import resource, sys, threading
import llama_cpp as C
sys.path.insert(0, {tests!r})
from test_gbnf import chain, nested
from edgecad.grammar import Grammar
from edgecad.llama import Model
m = Model({model!r})
case = sys.argv[1]
if case == "checked on a 128 KiB thread":  # edgecad: llama.cpp parses on a thread of its own
    threading.stack_size(128 * 1024)
    made = []
    t = threading.Thread(target=lambda: made.append(Grammar(m, nested({bound}))))
    t.start(); t.join()
    sys.exit(0 if made else 1)
texts = {{"20,000 deep": nested(20_000), "at the bound on a 128 KiB thread": nested({bound}),
          "a chain of 70,000 rules": chain(70_000), "x{{5,2}}": 'root ::= "a"{{5,2}}'}}
if case == "x{{5,2}}":  # endless: 256 MB more address space is enough to see it
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
run = lambda: C.llama_sampler_init_grammar(m.vocab, texts[case].encode(), b"root")
if "128 KiB" in case:
    threading.stack_size(128 * 1024)
    t = threading.Thread(target=run)
    t.start(); t.join()
else:
    run()
print("survived")
"""


@pytest.mark.parametrize("case", ["20,000 deep", "at the bound on a 128 KiB thread", "a chain of 70,000 rules",
                                  "x{5,2}", "checked on a 128 KiB thread"])
def test_llama_cpp_itself_dies_on_what_the_check_refuses(tiny_target, case):
    """The controls: llama_sampler_init_grammar called directly, in a subprocess, dies (SIGSEGV, or its memory
    exhausted); edgecad's Grammar at the bound on a musl-sized thread stack does not."""
    code = CONTROL.format(tests=str(Path(__file__).parent), model=str(tiny_target), bound=MAX_NESTING)
    r = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=120)
    if case.startswith("checked"):
        assert r.returncode == 0, r.stderr[-2000:]
    elif case == "x{5,2}":
        assert r.returncode != 0 and "survived" not in r.stdout, r.stderr[-2000:]
    else:
        assert r.returncode == -11, (r.returncode, r.stderr[-2000:])  # SIGSEGV
