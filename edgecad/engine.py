"""edgecad.Engine: the public API, shaped like llama-cpp-python's `Llama`.

An Engine resolves its arguments into a configuration (edgecad.config), loads the target (and the draft)
where its residency says (edgecad.residency), and runs the mode's decoder (edgecad.decode). This module is
the API's edge: a completion's run and its statistics in one place for every mode (its arguments checked by
edgecad.arguments, its text, stop strings and chunks shaped by edgecad.responses, a chat's prompt made by
edgecad.window), and the engine's lifetime.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import native
from .arguments import check_logprobs, completion_length, sampling_params, token_ids, unsupported
from .compat import CLOSED, Count, LlamaMembers, target_path
from .config import UNBOUNDED, EngineConfig, check_int, resolve, show_plan
from .decode import Stats, decoder_for
from .devices import placement, placement_line
from .errors import EdgecadError
from .follow import FollowParams, Watch
from .llama import Batch, Closing, Context, ContextParams, Model, set_verbose
from .measure import emulate_storage, learn, storage_bytes_read
from .moves import Moves
from .pager import Pager
from .plan import PagerParams
from .residency import Residency, merged_stats, residency_for
from .responses import TextChunks, chat_chunks, join, stop_list, with_stats
from .sampling import SamplingParams
from .tools import NO_TOOLS, Tools, answer_grammar, tool_chunks, tools_for
from .tree import TreeParams
from .window import ChatWindow, overflow_policy


def stats_dict(stats: Stats, plan, follows: bool = False) -> dict:
    """A completion's `edgecad` entry: its decoder's counters, its residency's measurements, the plan; follows:
    the engine follows its memory (moves may come)."""
    n, passes = len(stats.token_ids), max(stats.target_passes, 1)
    d = {
        "mode": stats.mode,
        "lossless": stats.lossless,
        "n_tokens": n,
        "token_ids": list(stats.token_ids),
        "prompt_tokens": stats.prompt_tokens,
        "prompt_tokens_reused": stats.prompt_reused,
        "prompt_seconds": stats.prompt_seconds,
        "seconds": stats.seconds,
        "tokens_per_second": n / stats.seconds if stats.seconds > 0 else 0.0,
        "target_passes": stats.target_passes,
        "prompt_passes": stats.prompt_passes,
        "mean_accepted_per_pass": n / passes,
        "draft_tokens": stats.draft_tokens,
        "prompt_draft_tokens": stats.prompt_draft_tokens,
        "prompt_pass_tokens": stats.prompt_pass_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "tree_nodes_per_pass": stats.draft_tokens / passes,
        "draft_passes": stats.draft_passes,
        "seconds_draft": stats.seconds_draft,
        "seconds_target": stats.seconds_target,
        "cpu_draft_seconds": stats.cpu_draft,
        "cpu_target_seconds": stats.cpu_target,
        "seconds_chain": stats.seconds_chain,
        "chain_tokens": stats.chain_tokens,
        "reused_tokens": stats.reused_tokens,
        "near_ties": stats.near_ties,
        "fallback": stats.fallback,
    }
    if stats.mode == "bild":
        d["bild_divergent_tokens"] = stats.bild_divergent
    bounded = plan.budget < UNBOUNDED
    d["config"], d["config_reason"] = plan.config, plan.reason  # (the last plan, after any move)
    d["follows_memory"], d["moves"], d["moves_before"] = follows, list(stats.moves), list(stats.moves_before)
    d["budget_bytes"] = plan.budget if bounded else None
    d["memory_plan"] = plan.parts if bounded else None
    d.update(stats.paging)  # where the target lives: its residency's measurements (residency.STATS and its own)
    d["target_compute_seconds"] = stats.seconds_target - d["io_wait_seconds"]
    return d


class Engine(LlamaMembers, Moves, Closing):
    """Run a target model, optionally sped up by a resident draft model; the rest of llama-cpp-python's `Llama`
    members are edgecad.compat's.

    Args (keyword-only after `draft`):
        target, draft: a GGUF path or a registry name (see `edgecad models list`); no target: the
            default pair (qwen2.5-coder 1.5B + 0.5B), once fetched with `edgecad models fetch`. model_path:
            the target, by `Llama`'s name.
        mode: "tree" (edgecad: token tree + adaptive fallback), "linear" (a chain, llama.cpp's
            speculative defaults), "bild" (Big Little Decoder; not lossless) or "target" (no draft).
            None: the automatic configuration picks the fastest of target-only and draft + tree, the
            target resident or paged, inside memory_budget (see edgecad.plan; stats say which and why).
        tree_params: override the mode's TreeParams (see edgecad.tree).
        memory_budget: everything the engine may hold resident (both models' weights, KV caches, compute
            buffers, the process itself): an int, "1.5GB", "60%" (of the draft + target files), "auto"
            (available memory or the cgroup limit, less a margin), or None for no limit.
        target_budget: fix the target's share instead: bytes of the target file kept resident ("450MB",
            "40%" of the target); the rest of the engine comes on top. For experiments and tests.
        pager: how the target is streamed under a budget (IO mode, read-ahead, storage profile).
        follow_memory: how the engine follows the memory it may use while it runs (edgecad.follow): between passes
            it re-plans when the room shrinks (at once) or grows (after a while), and moves to the new plan without
            losing the completion; below what it needs at the least, a completion stops with MemoryFloorError and
            the engine frees its models until the room comes back. None: plan once. Not with memory_budget=None,
            target_budget or remote devices; an explicit memory_budget is a ceiling the room never exceeds.
        pipeline: with a paged target and a draft, draft on while the target's pass waits on storage
            (a chain past the tree's best leaf, kept when the target accepts that branch). None (the
            default): the memory plan decides from the measured costs, on where a pass would wait on
            storage longer than its drafting takes (slow storage: 1.33x on an SD card's speed; 0.95-0.98x
            where compute hides the reads, docs/results.md).
        n_ctx: context length in tokens (prompt + completion).
        backend: "auto" (the draft on a GPU when this llama.cpp has one: Metal, Vulkan, CUDA; the target on
            the CPU) or "cpu". See edgecad.devices and docs/devices.md.
        draft_gpu_layers: draft layers on the GPU; None = all when a GPU is used (-1 = all, llama.cpp's way).
        target_gpu_layers: target layers on the GPU (default 0): only with a resident target, except on
            Metal (unproven): CUDA and Vulkan copy offloaded weights, which then cannot be paged.
        n_threads: compute threads; None = all cores this process may use.
        remote: ["host:port", ...] of `edgecad rpc-server`s on other devices (llama.cpp's RPC backend; needs
            scripts/build_rpc.sh): where the target does not fit this device's budget, its last layers live
            there, as many as each server's announced memory holds (edgecad.rpc, docs/devices.md).
        seed: default random seed of sampled completions.
        context_overflow: what a chat longer than the context does by default: "error", or "drop_oldest" (its
            oldest turns are dropped, the system prompt kept: edgecad.window); create_chat_completion's own wins.
        verbose: print llama.cpp's log.
        progress: show the models' load progress on stderr.
    """

    def __init__(
        self,
        target: Union[str, os.PathLike, None] = None,
        draft: Union[str, os.PathLike, None] = None,
        *,
        # decoding
        mode: Optional[str] = None,
        tree_params: Optional[TreeParams] = None,
        # memory
        memory_budget: Union[int, str, None] = "auto",
        target_budget: Union[int, str, None] = None,
        pager: Optional[PagerParams] = None,
        follow_memory: Optional[FollowParams] = FollowParams(),
        pipeline: Optional[bool] = None,
        n_ctx: int = 4096,
        # compute
        backend: str = "auto",
        draft_gpu_layers: Optional[int] = None,
        target_gpu_layers: int = 0,
        n_threads: Optional[int] = None,
        remote: Optional[list] = None,
        seed: Optional[int] = None,
        context_overflow: str = "error",
        verbose: bool = False,
        progress: bool = False,
        model_path: Union[str, os.PathLike, None] = None,
    ):
        self._target_model = self._draft_model = self._batch = self._target = self._decoder = None
        self._residency: Residency = Residency()
        native.lib.ec_interrupt_clear()
        set_verbose(verbose)
        self.verbose = verbose
        self.context_overflow = overflow_policy(context_overflow)  # chats' default (create_chat_completion's)
        cfg = self.config = resolve(target_path(target, model_path), draft, mode=mode, tree_params=tree_params,
                                    memory_budget=memory_budget, target_budget=target_budget, pager=pager,
                                    pipeline=pipeline, n_ctx=n_ctx, n_threads=n_threads, remote=remote,
                                    follow=follow_memory is not None, verbose=verbose)
        self.target_path, self.draft_path, self.n_threads = cfg.target_path, cfg.draft_path, cfg.n_threads
        self._placement = (backend, draft_gpu_layers, target_gpu_layers)  # (placement's arguments but the plan's)
        self._configure(cfg)
        t0, read0 = time.perf_counter(), storage_bytes_read()
        self._load_target(cfg, progress)
        self._draft_model = decoder_for(cfg.mode).load_draft(cfg, self._gpu[1], progress)
        self._loaded(cfg, t0, read0)
        self._make_contexts(cfg)
        if native.lib.ec_interrupt_pending():  # a Ctrl-C while C code ran (a log callback may have eaten it)
            self.close()
            raise KeyboardInterrupt
        self._rng = np.random.default_rng(_seed(seed))
        self._lock, self._streaming = threading.Lock(), False  # one completion at a time; it is an open stream
        self._computing = threading.Lock()  # held while a completion's next chunk is computed
        self._window = ChatWindow(self._target_model, self.tokenize, self.n_ctx)  # chats' prompts (edgecad.window)
        self._watch = Watch(follow_memory, cfg.ceiling, cfg.plan.budget, time.monotonic) if cfg.follows else None
        self.moves: list = []  # this engine's moves, the last MOVES_KEPT (edgecad.moves; completions' `moves` stats)
        self._freed = False  # the floor freed the models (the vocabulary kept): the next completion loads again

    def _configure(self, cfg: EngineConfig) -> None:
        """What a configuration sets: its plan, mode, residency and tree, where its models compute."""
        self.config, self.mode = cfg, cfg.mode
        self.memory_plan, self.budget_plan, self._costs = cfg.plan, cfg.plan.paging, cfg.plan.costs
        self._residency = residency_for(cfg)
        self.tree_params = self._residency.tree_params(cfg)
        self.device, d_gpu, t_gpu = placement(*self._placement, cfg.plan.paged)
        self._gpu = (t_gpu, d_gpu)
        self._on_gpu = (t_gpu != 0, d_gpu != 0)  # (target, draft) layers on a GPU: their CPU time says nothing
        if self.device is not None:
            show_plan(self.verbose, placement_line(self.device, d_gpu, t_gpu, cfg.plan.paged))

    def _load_target(self, cfg: EngineConfig, progress: bool) -> None:
        """Load the target as its residency says (a paged target is mapped without being read; the pager reads
        what the plan keeps); a move reloads the same Model object (Model.reload)."""
        res = self._residency
        params = res.model_params(self._gpu[0])
        with res.loading(cfg.target_path, self.verbose) as lazy:
            label = f"loading {cfg.target_path.name}" if progress else None
            if self._target_model is None:
                self._target_model = Model(cfg.target_path, params, cfg.target_info, progress=label)
            else:
                self._target_model.reload(params, label)
        res.start(self._target_model, cfg.local_info)
        self.lazy_load = lazy

    def _loaded(self, cfg: EngineConfig, t0: float, read0: Optional[int]) -> None:
        """Under a --storage profile, what the loads read from storage takes that storage's time."""
        emulate_storage(storage_bytes_read(since=read0), t0, cfg.pager.bytes_per_second)
        self.load_seconds = time.perf_counter() - t0  # models loaded, pinned layers read
        self.load_bytes_read = storage_bytes_read(since=read0)  # from storage (page-cache hits: 0)

    def _make_contexts(self, cfg: EngineConfig) -> None:
        """The target's context (with its residency's hooks) and the mode's decoder, which makes what it needs
        besides (the draft's context and drafter)."""
        t_gpu, d_gpu = self._gpu
        decoder = decoder_for(cfg.mode)
        n_seq = decoder.sequences(self.tree_params)
        # llama.cpp reserves max(outputs, sequences) logit rows and allows n_batch outputs: n_batch >= n_seq
        cp = ContextParams(n_ctx=cfg.n_ctx, n_batch=max(cfg.plan.n_batch, n_seq), n_seq_max=n_seq,
                           n_threads=cfg.n_threads, op_offload=t_gpu != 0)
        self._target = Context(self._target_model, cp, **self._residency.target_hooks())
        self.n_ctx = Count(self._target.n_ctx)  # (`n_ctx()` too, as Llama's)
        self._batch = Batch(max(cp.n_batch, n_seq), n_seq)
        self._decoder = decoder.build(self._target, self._batch, self.tree_params, self._draft_model,
                                      replace(cp, op_offload=d_gpu != 0), self._residency)
        self.pipeline = self._decoder.pipeline is not None

    # ------------------------------------------------------------------ completion
    # llama-cpp-python's `Llama` surface: same names, defaults and result shapes. Arguments that
    # edgecad does not implement are accepted at their defaults and refused otherwise (arguments.unsupported).

    def create_completion(
        self, prompt: Union[str, Sequence[int]], suffix: Optional[str] = None, max_tokens: Optional[int] = 16,
        temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
        logprobs: Optional[int] = None, echo: bool = False, stop: Union[str, Sequence[str], None] = None,
        frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
        stream: bool = False, seed: Optional[int] = None, tfs_z: float = 1.0, mirostat_mode: int = 0,
        mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: Optional[str] = None, stopping_criteria=None,
        logits_processor=None, grammar=None, logit_bias=None,
    ):
        """Complete `prompt` (text or token ids): a `text_completion` dict, or an iterator of chunks
        if stream. The dict's `edgecad` entry holds the statistics (configuration, speed, paging)."""
        unsupported(suffix=suffix, typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                    stopping_criteria=stopping_criteria, logits_processor=logits_processor)
        check_logprobs("logprobs", logprobs, echo)
        n_vocab = self.n_vocab()
        tokens = self.tokenize(prompt, special=True) if isinstance(prompt, (str, bytes)) else token_ids(prompt, n_vocab)
        prompt_text = prompt if isinstance(prompt, str) else (
            prompt if isinstance(prompt, bytes) else self.detokenize(tokens)).decode("utf-8", "ignore")
        sp = sampling_params(locals(), n_vocab)  # (the sampling arguments, by their declared names)
        chunks = self._completion_chunks(tokens, max_tokens, sp, stop_list(stop), seed, stream=stream,
                                         echo=prompt_text if echo else "", logprobs=logprobs,
                                         offset=len(prompt_text))  # (logprobs never come with echo)
        return chunks if stream else join(chunks)

    __call__ = create_completion

    def create_chat_completion(
        self, messages: Sequence[dict], functions=None, function_call=None, tools=None, tool_choice=None,
        temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0,
        stream: bool = False, stop: Union[str, Sequence[str], None] = None, seed: Optional[int] = None,
        response_format=None, max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0, repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
        mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: Optional[str] = None, logits_processor=None,
        grammar=None, logit_bias=None, logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None,
        context_overflow: Optional[str] = None,
    ):
        """Answer a conversation rendered with the model's own chat template (the GGUF's
        tokenizer.chat_template, through llama-cpp-python's sandboxed Jinja2 formatter; ChatML when it has
        none): a `chat.completion` dict, or an iterator of `chat.completion.chunk`s if stream. With tools, the
        answer's calls come as OpenAI's tool_calls (edgecad.tools). context_overflow: "drop_oldest" drops the
        oldest turns of a chat longer than the context ("error": refuse it; None: the Engine's),
        `dropped_messages` in its stats."""
        unsupported(typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode, logits_processor=logits_processor)
        check_logprobs("top_logprobs", top_logprobs)
        calls = tools_for(tools, tool_choice, functions, function_call)
        grammar = answer_grammar(calls, grammar, response_format)  # (a call's, the caller's or response_format's)
        sp = sampling_params(locals(), self.n_vocab())  # (the sampling arguments, by their names)
        # fitted once the request is checked: a fit moves where the chat keeps from (a refused request must not)
        tokens, stops, dropped = self._window.fit(messages, max_tokens, context_overflow or self.context_overflow,
                                                  calls)
        chunks = with_stats(self._completion_chunks(tokens, max_tokens, sp, stops + stop_list(stop), seed,
                                                    stream=stream, logprobs=(top_logprobs or 0) if logprobs else None,
                                                    chat=calls), dropped_messages=dropped)
        chunks = tool_chunks(chat_chunks(chunks), calls)
        return chunks if stream else join(chunks)

    def chat_tokens(self, messages: Sequence[dict], tools: Tools = NO_TOOLS) -> tuple[list[int], list[str]]:
        """The conversation (with the tools it may call) as prompt tokens (ending with the assistant's turn
        opened), and the template's stop strings (edgecad.window: the model's template, or ChatML)."""
        return self._window.tokens(messages, tools)

    def _completion_chunks(self, *args, stream: bool, **kw) -> Iterator[dict]:
        """One completion at a time per Engine (LlamaMembers._acquire): a call waits while another completion
        computes, and is refused while a stream is open."""
        self._acquire("another completion of this Engine is still streaming: read that stream to its end (or close "
                      "it) first, or use one Engine per concurrent stream")
        self._streaming = stream
        chunks = self._chunks(*args, **kw)
        try:
            native.lib.ec_interrupt_clear()  # a Ctrl-C before this completion is not this one's
            while True:
                with self._computing:  # (close waits for a chunk being computed; a paused stream does not hold it)
                    if self._target_model is None:
                        raise EdgecadError("this Engine was closed while the stream was open: create a new one")
                    try:
                        chunk = next(chunks)
                    except StopIteration:
                        return
                yield chunk
        finally:
            with self._computing:
                chunks.close()
            self._streaming = False
            self._lock.release()

    def _chunks(self, tokens: list[int], max_tokens: Optional[int], sp: SamplingParams, stops: list[str],
                seed: Optional[int], echo: str = "", logprobs: Optional[int] = None, offset: int = 0,
                chat: Optional[Tools] = None) -> Iterator[dict]:
        """The completion's chunks (edgecad.responses.TextChunks); logprobs: alternatives listed per token, or None;
        chat: the tools of a chat (its prompt is the messages; logprobs in a chat's shape), None for a completion."""
        if self._target_model is None:
            raise EdgecadError(CLOSED)
        max_tokens = completion_length(tokens, max_tokens, self.n_ctx, "prompt" if chat is None else "messages")
        before = self._between_completions()
        seed = _seed(seed)
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        stats = Stats(mode=self.mode, prompt_tokens=len(tokens), on_prompt_done=self._residency.prompt_done,
                      logprobs=logprobs, between_passes=self._between_passes if self._watch is not None else None,
                      moves_before=before)
        text = TextChunks(self._target_model, str(self.target_path), stops, echo, offset, chat)
        for m in (self._target_model, self._draft_model):
            if m is not None:
                m.check_file()
        self._residency.begin_completion()
        t0 = time.perf_counter()
        yield from text.chunks(self._tokens(tokens, max_tokens, sp, rng, stats, t0), stats)
        stats.seconds = time.perf_counter() - t0 - stats.prompt_seconds
        stats.paging = merged_stats(stats.paging_parts + [self._residency.completion_stats(stats)])
        last = text.last(stats)
        last["edgecad"] = stats_dict(stats, self.memory_plan, self._watch is not None)
        if not stats.moves:  # (a completion that moved ran two plans: it teaches neither)
            self._costs = learn(self._costs, last["edgecad"], self.memory_plan, self.config.local_info,
                                self.config.draft_info, self.n_threads, self._on_gpu)  # (for the next engine)
        yield last

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free both models and contexts, once a completion computing in another thread is done (an open
        stream paused between chunks does not hold it up: its next chunk then fails, the engine closed)."""
        lock, held = getattr(self, "_lock", None), False
        while lock is not None and not (held := lock.acquire(timeout=0.02)) and not self._streaming:
            pass
        try:
            # an open stream's chunk that another thread is computing finishes first; its next chunk then sees
            # the engine closed (_target_model is None, read under the same lock)
            with getattr(self, "_computing", None) or threading.Lock():
                for name in ("_decoder", "_batch", "_target", "_target_model", "_draft_model"):
                    obj = getattr(self, name, None)
                    if obj is not None:
                        obj.close()
                        setattr(self, name, None)
                if getattr(self, "_residency", None) is not None:
                    self._residency.close()  # (the model closed its pager already: close is idempotent)
        finally:
            if held:
                lock.release()

    # ------------------------------------------------------------------ test hooks
    # Documented and kept stable for tests and measurement scripts (they are not needed to generate).

    @property
    def check_kv(self) -> bool:
        """Set True: after every speculative step, assert both KV caches hold only the accepted path."""
        return self._decoder is not None and self._decoder.check_kv

    @check_kv.setter
    def check_kv(self, on: bool) -> None:
        self._decoder.check_kv = on

    @property
    def pager(self) -> Optional[Pager]:
        """The target's native pager when the target is paged (stats, inject_fault, set_throttle), else None."""
        return self._residency.pager if self._residency is not None else None

    @property
    def target_context(self) -> Optional[Context]:
        """The target's llama.cpp context (KV cache, logits)."""
        return self._target

    @property
    def draft_context(self) -> Optional[Context]:
        """The draft's llama.cpp context, None without a draft."""
        return self._decoder.draft_context if self._decoder is not None else None


def _seed(seed) -> Optional[int]:
    """llama.cpp's convention: -1 (or None) = a random seed."""
    if seed is None or seed == -1:
        return None
    check_int("seed", seed, 0, None, "or -1 for a random seed")
    return int(seed)
