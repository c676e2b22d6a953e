"""The built-in prompt set (prompts.jsonl: code, explanation, chat, story) and user prompt files."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgecadError

BUILTIN = Path(__file__).with_name("prompts.jsonl")


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Prompts as dicts with `id`, `category`, `prompt`; a JSONL file of such objects (or of
    {"prompt": ...} only), or the built-in set when path is None or "builtin"."""
    p = BUILTIN if path in (None, "builtin") else Path(path)
    if not p.exists():
        raise EdgecadError(f"prompt file not found: {p} (give a .jsonl file with one {{\"prompt\": ...}} per line)")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt = obj["prompt"]
        except (ValueError, KeyError, TypeError):
            raise EdgecadError(f"{p}:{n}: expected a JSON object with a \"prompt\" string") from None
        out.append({"id": obj.get("id", f"p{n}"), "category": obj.get("category", "user"), "prompt": prompt})
    if not out:
        raise EdgecadError(f"{p} holds no prompts")
    return out
