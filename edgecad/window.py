"""A chat's prompt: the conversation rendered by the model's chat template, as the tokens the context holds.

The template is the GGUF's own (tokenizer.chat_template) through llama-cpp-python's sandboxed Jinja2 formatter;
a model without one gets ChatML, as llama.cpp does (said once, on stderr): `<|im_start|>role` lines closed by
`<|im_end|>`, which is also the answer's stop string.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE

from .arguments import chat_prompt
from .errors import RequestError

CHATML_END = "<|im_end|>"  # ChatML's end of a turn: the answer's stop string under the default template


class ChatWindow:
    """A chat's prompt tokens for one model: its chat template (compiled on first use) and the tokenizer."""

    def __init__(self, model, tokenize: Callable[..., list[int]]):
        self.model = model  # the target (edgecad.llama.Model): its template, vocabulary and name
        self.tokenize = tokenize  # Engine.tokenize: (text, add_bos=, special=) -> token ids
        self._formatter = None  # the compiled template, once a chat needed it
        self.default_template = model.chat_template() is None  # the model has none of its own: ChatML stands in

    def formatter(self):
        """The model's chat template, compiled once; ChatML when the model has none (said once)."""
        if self._formatter is None:
            template = self.model.chat_template()
            if template is None:
                sys.stderr.write(f"edgecad: {self.model.path.name} has no chat template (tokenizer.chat_template): "
                                 "its chats are rendered as ChatML (<|im_start|>role ... <|im_end|>), as llama.cpp "
                                 "does\n")
            try:
                self._formatter = self.model.chat_formatter(template or CHATML_CHAT_TEMPLATE,
                                                            CHATML_END if template is None else None)
            except Exception as e:  # jinja2's syntax errors: the model's template is broken, not the messages
                raise RequestError(f"the model's chat template does not compile ({type(e).__name__}: {e}): "
                                   "complete a prompt in the model's own format instead (create_completion, "
                                   "/v1/completions, `edgecad generate`)", "messages") from None
        return self._formatter

    @property
    def chat_format(self) -> str:
        """`Llama.chat_format`'s name for the template in use: the model's own, or ChatML."""
        return "chatml" if self.default_template else "chat_template.default"

    def tokens(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """The conversation as prompt tokens (ending with the assistant's turn opened), and the template's stop
        strings. Under the default template, BOS comes as the vocabulary asks (as llama-cpp-python's chatml)."""
        prompt, add_bos, stops = chat_prompt(self.formatter(), messages)
        return self.tokenize(prompt, add_bos=add_bos or self.default_template, special=True), stops
