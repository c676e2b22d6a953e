"""Models from elsewhere and programs written for llama-cpp-python: a model without a chat template (ChatML, as
llama.cpp), in the API, the server and the chat; (real llama.cpp on tiny generated models)."""
import ctypes
import subprocess
import sys

import llama_cpp as C
import pytest

from edgecad import Engine, tiny

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
