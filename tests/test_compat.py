"""Models from elsewhere and programs written for llama-cpp-python: a model without a chat template (ChatML, as
llama.cpp), in the API, the server and the chat; an SPM vocabulary (Llama's, Gemma's) read and written as `Llama`
does; a recurrent target (Mamba) in target mode, resident and paged, its draft left out or refused; the members of
`Llama` a program touches, supported as Llama's or refused in one line (real llama.cpp on tiny generated models)."""
import ctypes
import itertools
import json
import subprocess
import sys

import llama_cpp as C
import pytest
from llama_cpp import Llama

from edgecad import Engine, tiny
from edgecad.errors import EdgecadError, NotSupportedError, RequestError

from helpers import PROMPTS
from test_server import Served

HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello the world"},
      {"role": "assistant", "content": "in an inner"}, {"role": "user", "content": "and then?"}]


@pytest.fixture(scope="module")
def untemplated(tiny_dir):
    """A tiny model whose file has no tokenizer.chat_template."""
    return tiny.write_model(tiny_dir / "no-template.gguf", tiny.TINY_TARGET, chat_template=None)


def llama_cpp_chatml(messages) -> str:
    """llama.cpp's own rendering of a conversation without a template (llama_chat_apply_template: ChatML)."""
    chat = (C.llama_chat_message * len(messages))(*[C.llama_chat_message(m["role"].encode(), m["content"].encode())
                                                     for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = C.llama_chat_apply_template(None, chat, len(messages), True, buf, len(buf))
    return buf.raw[:n].decode()


def test_a_model_without_a_template_chats_in_chatml_said_once(untemplated, capfd):
    with Engine(untemplated, mode="target", n_ctx=512, memory_budget=None) as e:
        tokens, stops = e.chat_tokens(HI)
        assert tokens == e.tokenize(llama_cpp_chatml(HI), special=True) and stops == ["<|im_end|>"]
        assert e.chat_format == "chatml"
        r = e.create_chat_completion(HI, max_tokens=8, temperature=0)
        assert r["choices"][0]["finish_reason"] in ("stop", "length") and r["usage"]["prompt_tokens"] == len(tokens)
    err = capfd.readouterr().err
    assert err.count("has no chat template") == 1 and "ChatML" in err


def test_the_server_answers_a_model_without_a_template(untemplated):
    import openai

    s = Served("--target", untemplated, "--mode", "target", "--n-ctx", 512)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        for _ in range(2):
            r = client.chat.completions.create(model=untemplated.name, messages=HI, max_tokens=6, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length")
        s.wait_for("has no chat template")
        assert s.count("has no chat template") == 1
    finally:
        assert s.stop() == 0, s.log


def test_the_chat_command_talks_to_a_model_without_a_template(untemplated, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgecad.cli", "chat", "--target", str(untemplated), "--memory-budget",
                        "none", "--temperature", "0", "-n", "6"], input=b"hello\nand then?\n", capture_output=True,
                       timeout=120, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0 and "create_completion" not in err and "edgecad: " in err, err
    assert err.count("has no chat template") == 1 and r.stdout.decode().count("\n\n") == 2


# ---------------------------------------------------------------------------- Llama's members

def llama_members(llm) -> dict:
    """What a Llama program reads of its model besides completions."""
    toks = llm.tokenize(b"hello the world")
    return {"n_ctx": llm.n_ctx(), "n_vocab": llm.n_vocab(), "n_embd": llm.n_embd(), "bos": llm.token_bos(),
            "eos": llm.token_eos(), "nl": llm.token_nl(), "metadata": llm.metadata, "model_path": llm.model_path,
            "chat_format": llm.chat_format, "tokens": toks, "text": llm.detokenize(toks, prev_tokens=toks[:1]),
            "special": llm.detokenize(toks, None, True), "verbose": llm.verbose}


def test_a_llama_program_reads_the_same_members(tiny_target):
    ref = llama_members(Llama(model_path=str(tiny_target), n_ctx=256, n_threads=2, verbose=False))
    with Engine(model_path=tiny_target, mode="target", n_ctx=256, memory_budget=None) as e:
        ours = llama_members(e)
        assert e.n_ctx == 256 and isinstance(e.n_ctx, int) and json.dumps({"n": e.n_ctx}) == '{"n": 256}'
    assert ours == ref


def test_reset_set_seed_and_the_openai_types(tiny_pair):
    draft, target = tiny_pair
    with Engine(target, draft, mode="tree", n_ctx=256, memory_budget=None) as e:
        first = e("hello the world", max_tokens=8, temperature=0)
        again = e("hello the world", max_tokens=8, temperature=0)
        assert again["edgecad"]["prompt_tokens_reused"] > 0
        stream = e("hello the world", max_tokens=8, stream=True)
        next(stream)
        with pytest.raises(EdgecadError, match="^a stream of this Engine is open: .*, then reset$"):
            e.reset()  # (as a completion is: waiting for the stream's reader could deadlock)
        stream.close()
        e.reset()  # both caches forgotten: the whole prompt is decoded again, to the same tokens
        after = e("hello the world", max_tokens=8, temperature=0)
        assert after["edgecad"]["prompt_tokens_reused"] == 0
        assert after["choices"][0]["text"] == first["choices"][0]["text"]
        e.set_seed(7)
        a = e("Once upon a time", max_tokens=8)["choices"][0]["text"]
        e.set_seed(7)
        assert e("Once upon a time", max_tokens=8)["choices"][0]["text"] == a
        e.set_cache(None)  # accepted: edgecad reuses the last call's prefix by itself
        chat = e.create_chat_completion(HI, max_tokens=6, temperature=0)
        typed = e.create_chat_completion_openai_v1(HI, max_tokens=6, temperature=0)
        assert type(typed).__name__ == "ChatCompletion"
        assert typed.choices[0].message.content == chat["choices"][0]["message"]["content"]
        chunks = list(e.create_chat_completion_openai_v1(messages=HI, max_tokens=6, temperature=0, stream=True))
        assert {type(c).__name__ for c in chunks} == {"ChatCompletionChunk"}


def test_members_edgecad_lacks_are_one_line_each(engine_256):
    e = engine_256
    for name in ("eval", "save_state", "create_embedding", "ctx", "n_tokens", "tokenizer"):
        with pytest.raises(NotSupportedError, match=rf"^Llama\.{name} is not supported by edgecad: \S") as x:
            getattr(e, name)
        assert "\n" not in str(x.value)
        assert not hasattr(e, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_member'"):
        e.no_such_member
    with pytest.raises(NotSupportedError, match="from_pretrained .*model_path"):
        Engine.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "*q4_k_m.gguf")
    with pytest.raises(RequestError, match="as target .* or as model_path"):
        Engine(e.model_path, model_path=e.model_path)
    with pytest.raises(RequestError, match="seed"):
        e.set_seed(-5)


def test_a_closed_engine_says_so(tiny_target):
    """Once closed, the members that need the model say the Engine is closed (a property's error was "'Engine'
    object has no attribute 'metadata'", a method's about NoneType)."""
    e = Engine(tiny_target, mode="target", n_ctx=256, memory_budget=None)
    assert e.metadata and e.chat_format  # (read before: a closed Engine does not answer from what it read)
    e.close()
    for member in ("metadata", "chat_format"):
        with pytest.raises(EdgecadError, match="^this Engine is closed: create a new one$") as x:
            getattr(e, member)
        assert not isinstance(x.value, AttributeError)
    for call in (lambda: e.tokenize(b"hello"), lambda: e.detokenize([1]), e.n_vocab, e.n_embd, e.token_eos,
                 lambda: e("hello", max_tokens=2), lambda: e.create_chat_completion(HI, max_tokens=2)):
        with pytest.raises(EdgecadError, match="^this Engine is closed: create a new one$"):
            call()
    assert e.model_path == str(tiny_target)  # (what needs no model still answers)


@pytest.fixture(scope="module")
def engine_256(tiny_target):
    with Engine(tiny_target, mode="target", n_ctx=256, memory_budget=None) as e:
        yield e


# ---------------------------------------------------------------------------- SentencePiece vocabularies

@pytest.fixture(scope="module")
def spm_pair(tiny_dir):
    return tiny.write_spm_pair(tiny_dir)


def test_an_spm_vocabulary_tokenizes_and_detokenizes_as_llama(spm_pair):
    ref = Llama(str(spm_pair[1]), n_ctx=256, n_threads=2, verbose=False)
    with Engine(spm_pair[1], mode="target", n_ctx=256, memory_budget=None) as e:
        for text in PROMPTS + ["Über ünïcode: ✓", " leading space"]:
            for add_bos, special in ((True, False), (False, False), (True, True)):
                toks = e.tokenize(text.encode(), add_bos, special)
                assert toks == ref.tokenize(text.encode(), add_bos, special)
                for sp in (False, True):  # (with BOS first, Llama drops the space SPM puts before the first word)
                    assert e.detokenize(toks, special=sp) == ref.detokenize(toks, special=sp), (text, toks)
        assert e.token_bos() == 1 and e.detokenize(e.tokenize(b"hello the world")) == b"hello the world"


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_an_spm_model_s_greedy_text_is_llama_s(spm_pair, mode):
    draft, target = spm_pair
    ref = Llama(str(target), n_ctx=256, n_threads=2, verbose=False)
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=256, memory_budget=None) as e:
        for prompt in PROMPTS:
            theirs = ref.create_completion(prompt, max_tokens=24, temperature=0)
            ours = e.create_completion(prompt, max_tokens=24, temperature=0)
            assert ours["choices"][0]["text"] == theirs["choices"][0]["text"] and ours["usage"] == theirs["usage"]
            streamed = "".join(c["choices"][0]["text"] for c in e.create_completion(prompt, max_tokens=24,
                                                                                     temperature=0, stream=True))
            assert streamed == theirs["choices"][0]["text"]
            echoed = e.create_completion(prompt, max_tokens=4, temperature=0, echo=True)["choices"][0]["text"]
            assert echoed == ref.create_completion(prompt, max_tokens=4, temperature=0, echo=True)["choices"][0]["text"]


# ---------------------------------------------------------------------------- recurrent models

@pytest.fixture(scope="module")
def mamba(tiny_dir):
    """A 16-layer Mamba over the F32 pair's vocabulary (its draft would pass the vocabulary check)."""
    return tiny.write_mamba(tiny_dir / "tiny-mamba.gguf", tiny.MambaSpec(n_layer=16))


def llama_greedy(llm, prompt: str, n: int) -> list[int]:
    llm.reset()
    return list(itertools.islice(llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True),
                                              temp=0.0), n))


@pytest.mark.parametrize("paged", [False, True], ids=["resident", "paged"])
def test_a_recurrent_target_runs_alone_with_its_own_greedy_tokens(mamba, tiny_draft, paged, capfd):
    """A recurrent state cannot drop the tokens a speculative step rejects: with a draft, the automatic
    configuration runs the target alone (said once); its tokens are llama.cpp's, call after call (a prompt that
    does not continue what the state holds is decoded whole again)."""
    ref = Llama(str(mamba), n_ctx=256, n_threads=2, verbose=False)
    budget = dict(target_budget="60%") if paged else dict(memory_budget=None)
    with Engine(mamba, tiny_draft, n_ctx=256, **budget) as e:
        assert e.mode == "target" and e.memory_plan.paged == paged
        for prompt in PROMPTS[:3] + [PROMPTS[0] + " and", PROMPTS[0]]:
            ours = e.create_completion(prompt, max_tokens=16, temperature=0)
            assert ours["edgecad"]["token_ids"] == llama_greedy(ref, prompt, 16), prompt
        turn = [{"role": "user", "content": "hello the world"}]
        a = e.create_chat_completion(turn, max_tokens=8, temperature=0)
        turn += [a["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        b = e.create_chat_completion(turn, max_tokens=8, temperature=0)
        with Engine(mamba, mode="target", n_ctx=256, memory_budget=None) as fresh:
            assert b["edgecad"]["token_ids"] == fresh.create_chat_completion(turn, max_tokens=8, temperature=0)[
                "edgecad"]["token_ids"]
    err = capfd.readouterr().err
    assert err.count("the draft is not used: tiny-mamba.gguf is a recurrent model (mamba)") == 1, err


def test_speculative_modes_with_a_recurrent_model_are_refused_in_one_line(mamba, tiny_target, tiny_draft):
    for mode in ("tree", "linear", "bild"):
        with pytest.raises(EdgecadError, match=rf"^mode '{mode}' cannot run: tiny-mamba.gguf is a recurrent model "
                                               r"\(mamba\): .*; use mode='target' \(or no draft\)$"):
            Engine(mamba, tiny_draft, mode=mode, n_ctx=256, memory_budget=None)
    with pytest.raises(EdgecadError, match="^mode 'tree' cannot run: tiny-mamba.gguf is a recurrent model"):
        Engine(tiny_target, mamba, mode="tree", n_ctx=256, memory_budget=None)  # (a recurrent draft alike)
