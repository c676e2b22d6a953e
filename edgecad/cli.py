"""The `edgecad` command: generate, chat, serve, models, bench, inspect, doctor.

Every edgecad error becomes one line on stderr and a non-zero exit status; errors written for API users
(`n_ctx=...`) name the command's flags instead (`--n-ctx ...`).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

from . import registry
from .errors import EdgecadError, RemoteLostError
from .gguf_file import mb
from .plan import STORAGE_PROFILES, PagerParams, parse_memory


# API argument -> the flag that sets it, for error messages (edgecad's errors name API arguments)
FLAGS = {"n_ctx": "--n-ctx", "memory_budget": "--memory-budget", "target_budget": "--target-budget",
         "backend": "--backend", "draft_gpu_layers": "--draft-gpu-layers", "target_gpu_layers": "--target-gpu-layers",
         "max_tokens": "-n", "n_threads": "--threads", "top_k": "--top-k", "top_p": "--top-p",
         "temperature": "--temperature", "seed": "--seed", "draft": "--draft", "mode": "--mode"}


def for_cli(message: str) -> str:
    """An error message with API arguments named as this command's flags: `top_p=5.0` -> `--top-p 5.0`,
    `a larger n_ctx` -> `a larger --n-ctx`; `mode='target'` -> `--mode target`."""
    def flag(m):
        name, value = m.group(1), m.group(2)
        if value is None and "_" not in name:  # plain words (mode, seed, draft...) only as `name=`
            return m.group(0)
        return FLAGS[name] + ("" if value is None else " " + value.strip("'"))
    # not inside a path or a longer name; `name=value` or a bare `name` (then only names with an underscore)
    return re.sub(r"(?<![/\w.-])(" + "|".join(FLAGS) + r")\b(?![\w-]|\.\w)(?:=('[^']*'|[^\s,;:)]*))?", flag, message)


def _max_tokens(s: str) -> int:
    """-n: a positive count, or -1 for "until the context is full" (llama.cpp's convention)."""
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1 and n != -1:
        raise argparse.ArgumentTypeError(f"{s} is not a token count: use a positive number, or -1 for "
                                         "\"until the context is full\"")
    return n


def _positive(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s} is not a positive integer")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line naming the fix (`edgecad CMD --help` for the rest)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _draft(a: argparse.Namespace) -> Optional[str]:
    """--draft, or the registry's draft when --target is another registry model (they share one tokenizer:
    the default draft serves them all); none for --mode target."""
    if a.draft is None and getattr(a, "mode", None) != "target" and registry.is_model_name(a.target) \
            and a.target != registry.DEFAULT_DRAFT:
        return registry.DEFAULT_DRAFT
    return a.draft


def _budget(a: argparse.Namespace) -> Optional[str]:
    """--memory-budget, with "none" meaning no limit (the Engine's None)."""
    return None if str(a.memory_budget).lower() == "none" else a.memory_budget


MIN_CTX = 256  # llama.cpp allocates a context in blocks of 256 tokens (llama-context.cpp: GGML_PAD(n_ctx, 256))
_BARE_NUMBER = re.compile(r"\s*[0-9]*\.?[0-9]+\s*")


def _check_values(a: argparse.Namespace) -> None:
    """Values the command line refuses where the Python API takes them: a context below the one llama.cpp
    allocates anyway (it would silently hold 256 tokens), and a budget without a unit (`--memory-budget 500`
    would be 500 bytes; the API's memory_budget=500_000_000 is an int of bytes and stays so)."""
    n_ctx = getattr(a, "n_ctx", None)
    if n_ctx is not None and n_ctx < MIN_CTX:
        raise EdgecadError(f"--n-ctx {n_ctx} is out of range: use an integer >= {MIN_CTX} (llama.cpp allocates "
                           f"a context in blocks of {MIN_CTX} tokens: a smaller one would hold {MIN_CTX} anyway)")
    for name in ("memory_budget", "target_budget"):
        value = getattr(a, name, None)
        if isinstance(value, str) and _BARE_NUMBER.fullmatch(value):
            n = value.strip()
            raise EdgecadError(f"{FLAGS[name]} {n} has no unit: give a size such as {n}MB or {n}GB "
                               f"(or {n}B if you mean bytes)")


def _engine(a: argparse.Namespace, draft: Optional[str], *, io: str = "prefetch", **kw):
    """The Engine the command's flags describe (memory, storage, devices, context, threads, seed); kw: what the
    command sets itself (mode, progress)."""
    from .engine import Engine

    return Engine(a.target, draft, memory_budget=_budget(a), target_budget=a.target_budget,
                  pager=PagerParams(io=io, storage=a.storage), backend=a.backend, draft_gpu_layers=a.draft_gpu_layers,
                  target_gpu_layers=a.target_gpu_layers, n_ctx=a.n_ctx, n_threads=a.threads, seed=a.seed,
                  remote=_remote(a), verbose=a.verbose, **({"follow_memory": None} if a.fixed_plan else {}), **kw)


def _remote(a: argparse.Namespace) -> Optional[list]:
    """--remote host:port,host:port (or repeated)."""
    return [e for v in (getattr(a, "remote", None) or []) for e in v.split(",") if e.strip()] or None


# ---------------------------------------------------------------------------- generate

def _prompt(a: argparse.Namespace) -> str:
    """-p TEXT, or the prompt read from -f FILE or standard input (`-p -`, `-f -`), less one final newline
    (a file's last line ends with one; llama.cpp's -f drops it too)."""
    if a.file is None and a.prompt != "-":
        return a.prompt
    name = "-" if a.file is None else a.file
    where = "standard input" if name == "-" else f"prompt file {name}"
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as e:
        raise EdgecadError(f"cannot read {where}: {e.strerror}: give a readable text file to -f") from None
    except UnicodeDecodeError:
        raise EdgecadError(f"{where} is not UTF-8 text: give the prompt as a UTF-8 text file") from None
    return text[:-1] if text.endswith("\n") else text


def cmd_generate(a: argparse.Namespace) -> int:
    from .chat import stats_lines

    prompt = _prompt(a)  # before loading the models: a bad file is one line at once
    with _engine(a, _draft(a), io=a.io, mode=a.mode) as eng:
        last = None
        for chunk in eng.create_completion(prompt, max_tokens=a.max_tokens, temperature=a.temperature,
                                           top_p=a.top_p, top_k=a.top_k, seed=a.seed, stream=True):
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
            last = chunk
        sys.stdout.write("\n")
        sys.stdout.flush()
        if a.stats:
            sys.stderr.write("\n".join(stats_lines(last["edgecad"])) + "\n")
    return 0


# ---------------------------------------------------------------------------- chat

def cmd_chat(a: argparse.Namespace) -> int:
    import time

    from . import chat

    tty = sys.stdin.isatty()
    draft = _draft(a)
    transcript = Path(a.resume) if a.resume else (Path(a.transcript) if a.transcript else
                                                  (chat.default_transcript() if tty else None))
    if a.resume:
        chat.read_transcript(transcript)  # a bad file: one line, before loading models
    if tty:
        sys.stderr.write(f"loading {a.target}" + (f" + {draft}" if draft else "") + f" (memory budget {a.memory_budget})...\n")
    t0 = time.perf_counter()
    with _engine(a, draft, progress=tty, context_overflow=a.context_overflow) as eng:
        if tty:
            sys.stderr.write(f"ready in {time.perf_counter() - t0:.1f} s: {chat.plan_line(eng.memory_plan)}"
                             + (f"; transcript {transcript}" if transcript else "") + "\n")
        eng.chat_tokens([{"role": "user", "content": "hi"}])  # the template compiled (ChatML: said now)
        sampling = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_tokens=a.max_tokens)
        conv = chat.Conversation(eng, transcript, system=a.system, resume=bool(a.resume), sampling=sampling)
        try:
            return chat.run(conv, tty=tty, err=sys.stderr, explain=for_cli)  # (its errors name the flags)
        except RemoteLostError as e:
            if transcript is None:
                raise
            raise RemoteLostError(f"{e}. The conversation so far is in {transcript}: continue it with "
                                  f"`edgecad chat --resume {transcript}`") from None
        finally:
            conv.close()


# ---------------------------------------------------------------------------- serve

def cmd_serve(a: argparse.Namespace) -> int:
    import os

    from .server import ServerParams, serve

    draft = _draft(a)
    key = a.api_key or os.environ.get("EDGECAD_API_KEY") or None

    def load():
        return _engine(a, draft, mode=a.mode, progress=sys.stderr.isatty(), context_overflow=a.context_overflow)

    names = tuple(dict.fromkeys([a.alias or a.target, Path(str(registry.resolve(a.target))).name]))
    sys.stderr.write(f"edgecad: loading {a.target}" + (f" + {draft}" if draft else "")
                     + f" (memory budget {a.memory_budget})...\n")
    def listed(flag: Optional[str], env: str) -> tuple[str, ...]:
        return tuple(x for x in (flag or os.environ.get(env) or "").replace(",", " ").split() if x)

    return serve(load, ServerParams(host=a.host, port=a.port, api_key=key, max_queue=a.max_queue, names=names,
                                    cors_origins=listed(a.cors_origins, "EDGECAD_CORS_ORIGINS"),
                                    allowed_hosts=listed(a.allowed_hosts, "EDGECAD_ALLOWED_HOSTS")))


# ---------------------------------------------------------------------------- models

def cmd_models(a: argparse.Namespace) -> int:
    d = registry.models_dir()
    if a.action == "list":
        print(f"models directory: {d}")
        rows = []
        for name, sp in registry.MODELS.items():
            path = registry.model_path(sp)  # a model an earlier edgecad fetched elsewhere is used from there
            state = ("not fetched" if not path.exists() else "fetched" if path.parent == d else
                     f"fetched in {path.parent}")
            rows.append((name, mb(sp.size), sp.description, state))
        # columns as wide as their widest cell; the state last, as it may be a directory
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for name, size, description, state in rows:
            print(f"  {name:<{widths[0]}}  {size:>{widths[1]}}  {description:<{widths[2]}}  {state}")
        return 0
    if a.action == "path":
        if len(a.names) != 1:
            raise EdgecadError("`edgecad models path` takes one model name")
        print(registry.resolve(a.names[0]))
        return 0
    names = a.names or ([registry.DEFAULT_DRAFT, registry.DEFAULT_TARGET] if a.action == "fetch" else
                        [n for n, sp in registry.MODELS.items() if registry.model_path(sp).exists()])
    for name in names:
        sp = registry.spec(name)
        if a.action == "fetch":
            path = registry.fetch(sp, progress=True)
            print(f"{name}: {path} (sha256 verified)")
        else:
            path = registry.verify(sp, full=True, progress=True)
            print(f"{name}: {path} OK (size and sha256 match)")
    if not names:
        print(f"no model is fetched in {d}: run `edgecad models fetch`")
    return 0


# ---------------------------------------------------------------------------- inspect

def cmd_inspect(a: argparse.Namespace) -> int:
    from .gguf_file import read_gguf

    g = read_gguf(registry.resolve(a.model))
    if a.memory_budget is not None:
        from .config import resolve

        cfg = resolve(a.model, a.draft, memory_budget=a.memory_budget, n_ctx=a.n_ctx, n_threads=a.threads,
                      pager=PagerParams(io=a.io), remote=_remote(a),
                      calibrate=False)  # shows the plan without running anything
        plan, costs = cfg.plan, cfg.plan.costs
        print(plan.describe())
        print(f"  costs         {'measured on this device' if costs.history or costs.read_measured else 'priors'}: "
              + ", ".join(f"{k} {v:.3g}" for k, v in vars(costs).items() if isinstance(v, float)))
        return 0
    print(g.describe())
    return 0


# ---------------------------------------------------------------------------- rpc-server

def cmd_rpc_server(a: argparse.Namespace) -> int:
    import ipaddress
    import os
    import signal
    import threading

    from . import rpc
    from .devices import cpu_device
    from .llama import default_threads
    from .measure import auto_budget, cache_dir, process_rss
    from .rpc import server as rpc_server

    rpc.require()
    host, port = rpc.parse_endpoint(f"{a.host}:{a.port}")  # (an IPv4 address: all llama.cpp's server takes)
    loopback = ipaddress.ip_address(host).is_loopback
    if not loopback and not a.allow_network:
        raise EdgecadError(f"--host {a.host} would let anyone who reaches this port run code on this device's "
                           "memory: llama.cpp's RPC protocol has no authentication and no encryption. Use it on a "
                           "network you trust only, with --allow-network")
    if not loopback:
        sys.stderr.write("edgecad: warning: the RPC protocol has no authentication and no encryption: anyone who "
                         f"reaches {a.host}:{a.port} can use this device; run it on a trusted network only\n")
    budget = parse_memory(a.memory_budget, 0, auto_budget)
    own = process_rss()
    if budget <= own:
        raise EdgecadError(f"--memory-budget {a.memory_budget} is below what the server itself holds "
                           f"({own / 1e6:,.0f} MB): give more")
    cache = None if a.cache is None else os.path.expanduser(a.cache) if a.cache else str(cache_dir() / "rpc")
    if cache:
        os.makedirs(cache, exist_ok=True)
    threads = a.threads or default_threads()
    rpc_server.announce(cpu_device(), budget - own, budget)
    print(f"edgecad rpc-server: {a.host}:{a.port}, announcing {(budget - own) / 1e6:,.0f} MB of a "
          f"{budget / 1e6:,.0f} MB budget, CPU with {threads} threads" + (f", cache {cache}" if cache else "")
          + "; Ctrl-C stops it", flush=True)
    failed = threading.Event()

    def run():
        rpc_server.serve(host, port, n_threads=threads, cache_dir=cache)
        failed.set()  # (it returns only when it could not start)

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=run, daemon=True, name="rpc-server").start()
    try:
        while not failed.wait(0.5):
            pass
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("edgecad rpc-server: stopped\n")
        os._exit(0)  # (llama.cpp's server thread waits in accept() for good)
    raise EdgecadError(f"the RPC server could not listen on {a.host}:{a.port} (see the line above): is the port in "
                       "use? Choose another with --port")


# ---------------------------------------------------------------------------- doctor

def cmd_doctor(a: argparse.Namespace) -> int:
    """The report for the pair `generate` and `chat` would run with these flags (_draft: a model that is not in
    the registry runs alone unless --draft is given); errors in it name this command's flags."""
    from .doctor import report

    target = a.target or registry.DEFAULT_TARGET
    draft = _draft(argparse.Namespace(target=target, draft=a.draft))
    report(target, draft, _budget(a), n_ctx=a.n_ctx, measure=not a.no_measure, explain=for_cli, reset=a.reset_costs)
    return 0


# ---------------------------------------------------------------------------- main

def _add_engine_flags(p: argparse.ArgumentParser, *, temperature: Optional[float], overflow: str = "") -> None:
    """The flags of every command that runs an engine (generate, chat, serve): sampling (not for serve, whose
    requests say it), context (a chat's overflow: chat and serve), memory, devices."""
    if temperature is not None:
        p.add_argument("--temperature", type=float, default=temperature,
                       help=f">= 0; 0 = greedy (default {temperature})")
        p.add_argument("--top-k", type=int, default=40, help=">= 0; 0 = off (default 40)")
        p.add_argument("--top-p", type=float, default=0.95, help="0 < p <= 1; 1 = off (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help=">= 0; -1 = random (the default)")
    p.add_argument("--n-ctx", type=int, default=4096, help=N_CTX_HELP)
    if overflow:
        p.add_argument("--context-overflow", default=overflow, choices=["drop_oldest", "error"],
                       help=f"a chat longer than --n-ctx: drop its oldest turns (the system prompt stays) or refuse it "
                            f"(default {overflow})")
    p.add_argument("--threads", type=int, default=None, help="compute threads, 1..512 (default: the cores)")
    p.add_argument("--memory-budget", default="auto",
                   help="memory for the whole engine (both models, caches, buffers): 1.5GB, 900MiB, 60%% (of the "
                        "model files), auto (available memory or the cgroup limit, less a margin, followed while the "
                        "engine runs; the default), none (no limit)")
    p.add_argument("--fixed-plan", action="store_true",
                   help="plan once at load: do not follow the memory while running (README, Memory that moves)")
    p.add_argument("--target-budget", default=None, help="instead of --memory-budget: the target's share kept "
                                                         "resident (450MB, 40%%), the rest on top; for experiments")
    p.add_argument("--storage", default="native", choices=list(STORAGE_PROFILES),
                   help="emulate slower storage by throttling the pager's reads")
    _add_device_flags(p)
    _add_remote_flag(p)
    p.add_argument("--verbose", action="store_true", help="print llama.cpp's log")


N_CTX_HELP = (f"context length in tokens (a chat: the whole conversation), >= {MIN_CTX}; llama.cpp rounds it up "
              f"to a multiple of {MIN_CTX} (default 4096)")


def _add_remote_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote", action="append", metavar="HOST:PORT[,...]",
                   help="`edgecad rpc-server`s on other devices: where the target does not fit here, its last "
                        "layers live there (needs the RPC build: scripts/build_rpc.sh)")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "cpu"],
                   help="auto (default): the draft on a GPU when this llama.cpp has one (Metal, Vulkan), the "
                        "target on the CPU; cpu: no GPU")
    p.add_argument("--draft-gpu-layers", type=int, default=None, help="draft layers on the GPU (default: all "
                                                                      "when a GPU is used; -1 = all)")
    p.add_argument("--target-gpu-layers", type=int, default=0, help="target layers on the GPU (default 0; only "
                                                                    "with a resident target, except on Metal)")


def _version() -> str:
    """`edgecad X (llama-cpp-python Y)`: the installed distributions' versions, else the modules' own (a source
    tree run without installing)."""
    import importlib
    from importlib import metadata

    def version(dist: str, module: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:
                return getattr(importlib.import_module(module), "__version__", "unknown")
            except ImportError:
                return "not installed"
    return f"edgecad {version('edgecad', 'edgecad')} (llama-cpp-python {version('llama-cpp-python', 'llama_cpp')})"


class _Version(argparse.Action):
    """-V/--version, looked up only when asked (argparse's own action takes the text on every run)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print edgecad's and llama-cpp-python's versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgecad", description="Run a language model larger than your device's memory.")
    p.add_argument("-V", "--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="complete a prompt")
    g.add_argument("--target", default=registry.DEFAULT_TARGET, help="target GGUF path or registry name")
    g.add_argument("--draft", default=None,
                   help="draft GGUF path or registry name (default: the registry draft when --target is a registry model)")
    g.add_argument("--mode", default=None, choices=["tree", "linear", "bild", "target"],
                   help="tree (default with a draft), linear, bild (not lossless) or target (no draft)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", "-p", help="the prompt; - reads it from standard input")
    prompt.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE (- : standard input)")
    g.add_argument("-n", "--max-tokens", type=_max_tokens, default=128,
                   help="tokens to generate (default 128; -1 = until the context is full)")
    _add_engine_flags(g, temperature=0.0)
    g.add_argument("--io", default="prefetch", choices=["prefetch", "demand"], help="how paged layers are read")
    g.add_argument("--stats", action="store_true", help="print run statistics to stderr")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="an offline chat in the terminal (the default pair, automatic configuration)")
    c.add_argument("--target", default=registry.DEFAULT_TARGET, help="target GGUF path or registry name")
    c.add_argument("--draft", default=None, help="draft GGUF path or registry name (default: the registry draft "
                                                 "when --target is a registry model)")
    c.add_argument("--system", default=None, help="a system message that opens the conversation")
    c.add_argument("--resume", default=None, metavar="FILE", help="continue the conversation in this transcript "
                                                                  "(and append to it)")
    c.add_argument("--transcript", default=None, metavar="FILE",
                   help="append the conversation to FILE as JSONL (default on a terminal: a new file in "
                        "~/.local/share/edgecad/chats)")
    c.add_argument("-n", "--max-tokens", type=_max_tokens, default=None,
                   help="longest answer (default, or -1: until the context is full)")
    _add_engine_flags(c, temperature=0.2, overflow="drop_oldest")  # (0.2: llama-cpp-python's chat default)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on this machine (/v1/chat/completions, "
                                      "/v1/completions, /v1/models)")
    sv.add_argument("--target", default=registry.DEFAULT_TARGET, help="target GGUF path or registry name")
    sv.add_argument("--draft", default=None, help="draft GGUF path or registry name (default: the registry draft "
                                                  "when --target is a registry model)")
    sv.add_argument("--mode", default=None, choices=["tree", "linear", "bild", "target"],
                    help="default: the automatic configuration (see `edgecad inspect --memory-budget`)")
    sv.add_argument("--alias", default=None, help="the model's name in the API (default: --target as given; the "
                                                  "file name is accepted too)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                                                        "only; 0.0.0.0 exposes the model to the network)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    sv.add_argument("--api-key", default=None, help="require \"Authorization: Bearer KEY\" on /v1/* (or set "
                                                    "EDGECAD_API_KEY, which other users cannot see in `ps`)")
    sv.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                    help="web pages that may use the server besides loopback ones (http://localhost:3000 is "
                         "allowed already): origins separated by commas, e.g. https://chat.example.org, or * for "
                         "any page (or set EDGECAD_CORS_ORIGINS); others get 403")
    sv.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                    help="host names clients may reach the server by besides localhost, IP addresses and --host "
                         "(e.g. behind a proxy; or set EDGECAD_ALLOWED_HOSTS); others get 403 (DNS rebinding)")
    sv.add_argument("--max-queue", type=int, default=8, help="requests that may wait behind the running one; more "
                                                             "get 429 (default 8)")
    _add_engine_flags(sv, temperature=None, overflow="error")
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list, fetch, verify the registry models")
    m.add_argument("action", choices=["list", "fetch", "verify", "path"])
    m.add_argument("names", nargs="*", help="registry names (default: the draft/target pair)")
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="every baseline side by side: speed, memory, IO floor, fidelity")
    b.add_argument("--target", default=registry.DEFAULT_TARGET)
    b.add_argument("--draft", default=registry.DEFAULT_DRAFT)
    b.add_argument("--modes", nargs="+", default=None,
                   help="rows (spaces or commas): target target-paged target-prefetch linear-paged bild-paged "
                        "edgecad-paged edgecad-paged-pipeline edgecad, and on request target-paged-cache "
                        "edgecad-paged-cache (streamed through the page cache); with --memory-limit: "
                        "llama-cpp-python target-paged tree-paged edgecad, and edgecad-cache")
    b.add_argument("--target-budget", default="40%", help="target share kept resident in the paged rows "
                                                          "(default 40%%)")
    b.add_argument("--memory-limit", default=None, metavar="SIZES",
                   help="equal device memory: run each row as its own process in a memory cgroup of each size "
                        "(e.g. 800MB,1GB,1.25GB), model files dropped from the page cache first; rows "
                        "llama-cpp-python target-paged tree-paged edgecad")
    b.add_argument("--n-ctx", type=_positive, default=512, help="context of every --memory-limit row (llama-cpp-python's "
                                                          "default, 512)")
    b.add_argument("--n-prompts", type=_positive, default=None, help="use the first N prompts (default: all; 3 with "
                                                               "--memory-limit)")
    b.add_argument("--storage", default="native", choices=list(STORAGE_PROFILES))
    b.add_argument("--prompts", default="builtin", help="builtin or a .jsonl file of {\"prompt\": ...}")
    b.add_argument("-n", "--max-tokens", type=_positive, default=64)
    b.add_argument("--repeat", type=_positive, default=1)
    b.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default)")
    b.add_argument("--threads", type=_positive, default=None)
    b.add_argument("--json", default=None, help="write the results as JSON")
    b.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--quick", action="store_true", help="tiny generated models, 3 prompts, a 50%% target share (seconds; for CI)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=lambda a: __import__("edgecad.bench", fromlist=["main_bench"]).main_bench(a))

    i = sub.add_parser("inspect", help="describe a GGUF model: layers, bytes, quantisation, tokenizer")
    i.add_argument("model", help="GGUF path or registry name")
    i.add_argument("--memory-budget", default=None,
                   help="print the memory plan for this whole-engine budget (1.5GB, 60%%, auto): the configuration "
                        "edgecad would choose, how the budget is split, and the target's paging plan")
    i.add_argument("--draft", default=None, help="with --memory-budget: the draft model of the pair")
    i.add_argument("--n-ctx", type=_positive, default=4096, help=f"with --memory-budget: context length, >= {MIN_CTX} "
                                                                 "(default 4096)")
    i.add_argument("--threads", type=_positive, default=None, help="with --memory-budget: compute threads (for "
                                                                    "the costs)")
    i.add_argument("--io", default="prefetch", choices=["prefetch", "demand"], help="IO mode of the plan")
    _add_remote_flag(i)
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("rpc-server", help="lend this device's memory and CPU to an engine on another device "
                                          "(llama.cpp's RPC server; the engine's --remote)")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                       "--allow-network)")
    r.add_argument("--port", type=int, default=50052, help="TCP port (default 50052)")
    r.add_argument("--memory-budget", default="auto", help="memory this server may hold (1.5GB, 900MiB, auto: "
                                                           "available memory or the cgroup limit; the default)")
    r.add_argument("--cache", nargs="?", const="", default=None, metavar="DIR",
                   help="keep received weights in DIR (default: rpc/ in edgecad's cache, ~/.cache/edgecad): the "
                        "next load of the same model sends only their hashes")
    r.add_argument("--threads", type=_positive, default=None, help="compute threads (default: the cores)")
    r.add_argument("--allow-network", action="store_true",
                   help="listen on a non-loopback --host although the protocol has no authentication")
    r.set_defaults(func=cmd_rpc_server)

    dr = sub.add_parser("doctor", help="what this device can do: cores, memory, storage speed, backends, and the "
                                       "plan edgecad would run for a model pair")
    dr.add_argument("--target", default=None, help="target GGUF path or registry name (default: the default pair)")
    dr.add_argument("--draft", default=None, help="draft GGUF path or registry name (default: the registry draft "
                                                  "when --target is a registry model, as generate and chat choose)")
    dr.add_argument("--memory-budget", default="auto", help="the budget to plan for (default auto)")
    dr.add_argument("--n-ctx", type=_positive, default=4096, help=f"context length to plan for, >= {MIN_CTX} "
                                                                  "(default 4096)")
    dr.add_argument("--no-measure", action="store_true", help="do not measure the storage's read speed")
    dr.add_argument("--reset-costs", nargs="?", const="pair", choices=("pair", "all"), default=None,
                    help="forget the costs this device learnt for the pair (or all of them: all) before planning")
    dr.set_defaults(func=cmd_doctor)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_values(args)
        return args.func(args)
    except EdgecadError as e:
        sys.stdout.flush()
        sys.stderr.write(f"edgecad: error: {for_cli(str(e))}\n")
        return 1
    except BrokenPipeError:  # e.g. `edgecad inspect ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("edgecad: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
