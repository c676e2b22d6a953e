#!/usr/bin/env bash
# Fuzz the model-file gate for longer (default 10 minutes): seeds are a small generated model and each shape that
# aborts llama.cpp made from it (tests/test_gguf_file.py: write_fuzz_seeds), the tiny test models and the headers of
# the fetched real models; a crash lands in tests/fuzz-regressions/ (keep it: the suite replays every file there).
# usage: bash scripts/fuzz_gguf.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
corpus="$(mktemp -d)"
python - "$corpus" <<'PY'
import sys
from pathlib import Path

from edgecad import registry, tiny
from edgecad.gguf_file import read_gguf

sys.path.insert(0, "tests")
from test_gguf_file import write_fuzz_seeds  # noqa: E402

out = Path(sys.argv[1])
write_fuzz_seeds(out)
tiny.write_pair(out)
for name in registry.MODELS:  # the real models' headers (their data cut off: the gate then says truncated)
    try:
        path = registry.resolve(name)
    except Exception:
        continue
    with open(path, "rb") as f:
        (out / f"{name}.header").write_bytes(f.read(read_gguf(path).data_offset))
PY
mkdir -p tests/fuzz-regressions
cd tests/fuzz-regressions
python ../fuzz_gguf.py "$corpus" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8000000 \
    -print_final_stats=1
