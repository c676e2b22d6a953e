"""Each crafted attack file (tests/test_gguf_file.py: ATTACKS, built from the tiny model) through: a header
reader given as a file (e.g. an older edgecad's gguf_file.py), llama.cpp directly (llama_cpp.Llama, in a child
process: a crash there kills only the child), and edgecad's gate now; then the gate's cost on the real models.

    python scripts/eval_bad_files.py [OLD_GGUF_FILE_PY]
    (git show d9a5ac6:edgecad/gguf_file.py > /tmp/old.py, with `from .errors` made `from edgecad.errors`)
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import craft_gguf  # noqa: E402
from test_gguf_file import ATTACKS  # noqa: E402

from edgecad import registry, tiny  # noqa: E402
from edgecad.errors import ModelFileError  # noqa: E402
from edgecad.gguf_file import read_gguf  # noqa: E402


def first_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "")[:110]


def llama_directly(path) -> str:
    r = subprocess.run([sys.executable, "-c", f"from llama_cpp import Llama; Llama({str(path)!r}, verbose=False)"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return "loaded"
    if r.returncode < 0:
        return f"killed by signal {-r.returncode} (exit {128 - r.returncode})"
    return f"refused, exit {r.returncode}: {first_line(r.stderr)}"


def reader(fn, path) -> str:
    try:
        fn(path)
        return "passed"
    except ModelFileError as e:
        return "refused: " + str(e).split(": ", 1)[-1][:100]
    except Exception as e:  # noqa: BLE001 (what an older reader let through)
        return f"{type(e).__name__}: {e}"[:110]


def main():
    old = None
    if len(sys.argv) > 1:
        spec = importlib.util.spec_from_file_location("old_gguf_file", sys.argv[1])
        old = importlib.util.module_from_spec(spec)
        sys.modules["old_gguf_file"] = old  # (dataclasses look their module up)
        spec.loader.exec_module(old)
    d = Path(tempfile.mkdtemp())
    _, target = tiny.write_pair(d)
    print("| attack | older reader | llama.cpp directly | the gate now |\n|---|---|---|---|")
    for name, (kw, _) in ATTACKS.items():
        path = craft_gguf(target, d / "crafted.gguf", **kw)
        print(f"| {name} | {reader(old.read_gguf, path) if old else '-'} | {llama_directly(path)} | "
              f"{reader(read_gguf, path)} |", flush=True)
    print("\nthe gate's cost: reading and checking a real model's header (best of 10)")
    for name in registry.MODELS:
        try:
            path = registry.resolve(name)
        except Exception:  # noqa: BLE001 (not fetched)
            continue
        for label, fn in (("older", old.read_gguf if old else None), ("now", read_gguf)):
            if fn is None:
                continue
            ts = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn(path)
                ts.append(time.perf_counter() - t0)
            print(f"  {name:24} {label:5} {min(ts) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
