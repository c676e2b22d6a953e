"""The rest of llama-cpp-python's `Llama`: the members a Llama program touches besides its completions.

Engine inherits LlamaMembers. The cheap members behave as Llama's (the model's counts and special tokens, its
metadata, tokens to text and back, reset, the seed, the OpenAI-typed chat); the others (low-level evaluation and
sampling, saved states, embeddings, llama.cpp's own objects) are refused in one line naming the member, as an
AttributeError (hasattr says False, as for any member a class lacks). The table is README's.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from .config import check_int
from .errors import EdgecadError, NotSupportedError, RequestError


class Count(int):
    """A count that is also Llama's method of that name: `llm.n_ctx` (edgecad's attribute, an int) and
    `llm.n_ctx()` (llama-cpp-python's method) are both the context's length."""

    def __call__(self) -> int:
        return int(self)


CLOSED = "this Engine is closed: create a new one"  # what a closed Engine's members say
_TOKENS = "edgecad's decoders run the target (and the draft's trees) themselves: use create_completion"
_STATE = "the engine's state is two KV caches (target and draft) and the pager's; a call reuses the last one's prefix"
REFUSED = {  # Llama's members edgecad does not have: why, and what to use
    **dict.fromkeys(("eval", "sample", "generate"), _TOKENS),
    **dict.fromkeys(("n_tokens", "input_ids", "scores", "eval_tokens", "eval_logits"),
                    "edgecad keeps no past logits; target_context.tokens lists what the target's cache holds"),
    **dict.fromkeys(("save_state", "load_state", "cache"), _STATE),
    **dict.fromkeys(("create_embedding", "embed", "pooling_type"),
                    "edgecad's contexts compute no embeddings: use llama_cpp.Llama(embedding=True)"),
    **dict.fromkeys(("ctx", "model", "_ctx", "_model", "context_params", "model_params", "tokenizer", "tokenizer_",
                     "chat_handler", "draft_model"),
                    "llama.cpp's objects belong to edgecad's contexts: use tokenize/detokenize, target_context"),
    **dict.fromkeys(("logits_to_logprobs", "longest_token_prefix"), "use llama_cpp.Llama's static method"),
}


def target_path(target, model_path):
    """The target as given: `target` (edgecad's name) or `model_path` (Llama's), not both."""
    if model_path is None:
        return target
    if target is not None:
        raise RequestError("give the target model once: as target (the first argument) or as model_path",
                           "model_path")
    return model_path


class LlamaMembers:
    """llama-cpp-python's `Llama` members besides its completions, for Engine (edgecad.engine)."""

    def __getattr__(self, name: str):  # (only for names the Engine lacks)
        if name in REFUSED:
            raise NotSupportedError(f"Llama.{name} is not supported by edgecad: {REFUSED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _open_target(self):
        """The target (edgecad.llama.Model), or CLOSED's EdgecadError once the Engine is closed (not an
        AttributeError: in a property, that would become __getattr__'s "no attribute")."""
        model = getattr(self, "_target_model", None)
        if model is None:
            raise EdgecadError(CLOSED)
        return model

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str] = None, **kwargs):
        raise NotSupportedError("Llama.from_pretrained is not supported by edgecad (it never downloads while it "
                                "runs): fetch the GGUF file first and give its path as model_path")

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: Union[str, bytes], add_bos: bool = True, special: bool = False, *,
                 param: str = "prompt") -> list[int]:
        """Token ids of `text` (llama-cpp-python's `Llama.tokenize`): BOS when the vocabulary uses one and
        add_bos; special-token texts parsed as special tokens when `special`. param: the argument the text came
        from, named by its error (a chat's prompt comes from its "messages")."""
        if isinstance(text, str):
            try:
                text = text.encode("utf-8")
            except UnicodeEncodeError as e:  # (a chat's position is in its rendered prompt: not said)
                where = f"at character {e.start}" if param == "prompt" else f"in the {param}"
                raise RequestError(f"the text is not valid Unicode ({e.reason} {where}): send UTF-8 text",
                                   param) from None
        return self._open_target().tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """The text of `tokens` (llama-cpp-python's `Llama.detokenize`; prev_tokens is not needed, as for its
        own tokenizer). As Llama's, without the space an SPM vocabulary (Llama's, Gemma's) puts after BOS, before
        the first word."""
        text = self._open_target().detokenize(tokens, special=special)
        return text[1:] if len(tokens) and tokens[0] == self.token_bos() and text[:1] == b" " else text

    def n_vocab(self) -> int:
        return self._open_target().n_vocab

    def n_embd(self) -> int:
        return self._open_target().n_embd()

    def token_bos(self) -> int:
        return self._open_target().special_tokens()[0]

    def token_eos(self) -> int:
        return self._open_target().special_tokens()[1]

    def token_nl(self) -> int:
        return self._open_target().special_tokens()[2]

    # ------------------------------------------------------------------ the model

    @property
    def model_path(self) -> str:
        """The target's file (Llama's model_path)."""
        return os.fspath(self.target_path)

    @property
    def metadata(self) -> dict[str, str]:
        """The target's GGUF metadata as llama.cpp gives it (Llama's metadata)."""
        model = self._open_target()
        if getattr(self, "_metadata", None) is None:
            self._metadata = model.metadata()
        return self._metadata

    @property
    def chat_format(self) -> str:
        """The chat template in use: "chat_template.default" (the model's own) or "chatml" (it has none)."""
        self._open_target()
        return self._window.chat_format

    # ------------------------------------------------------------------ state

    def _acquire(self, refusal: str) -> None:
        """Take the Engine's lock (one completion at a time: both contexts' KV is one state), waiting while a
        completion computes; refused with `refusal` while a stream is open (waiting for its reader could deadlock:
        the reader may be the caller, or need the caller's thread)."""
        while not self._lock.acquire(timeout=0.02):
            if self._streaming:
                raise EdgecadError(refusal)

    def reset(self) -> None:
        """Forget what both KV caches hold (Llama.reset): the next call decodes its whole prompt."""
        self._acquire("a stream of this Engine is open: read it to its end (or close it), then reset")
        try:
            for ctx in (self.target_context, self.draft_context):
                if ctx is not None:
                    ctx.clear()
            self._window.forget()
        finally:
            self._lock.release()

    def set_seed(self, seed: int) -> None:
        """The random seed of the next sampled completions without a seed of their own (Llama.set_seed)."""
        if seed != -1:
            check_int("seed", seed, 0, None, "or -1 for a random seed")
        self._rng = np.random.default_rng(None if seed == -1 else int(seed))

    def set_cache(self, cache) -> None:
        """Accepted and not used (Llama.set_cache): each call reuses the prefix it shares with the last one."""

    def create_chat_completion_openai_v1(self, *args, **kwargs):
        """create_chat_completion's result as the openai package's types (Llama's method of that name)."""
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion(**self.create_chat_completion(*args, **kwargs))
