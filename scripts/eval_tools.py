"""What tool calling costs: one engine, the same question with no tools, with tools and tool_choice "auto" (the
answer parsed for calls), and with "required" (the answer held to one call by the function's schema grammar);
greedy, interleaved rounds (the machine's speed drifts), generation tok/s of each.

    python scripts/eval_tools.py [MEMORY_BUDGET]      # default: no budget (the plan holds the default pair)
"""
import sys

from edgecad import Engine

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}]
MESSAGES = [{"role": "user", "content": "What's the weather like in Boston today?"}]


def main():
    budget = sys.argv[1] if len(sys.argv) > 1 else None
    with Engine(memory_budget=budget, n_ctx=2048) as e:
        print("config", e.memory_plan.config, flush=True)
        for _ in range(3):
            for kind in ("none", "auto", "required"):
                kw = {} if kind == "none" else dict(tools=TOOLS, tool_choice=kind)
                r = e.create_chat_completion(MESSAGES, temperature=0, max_tokens=40, **kw)
                st, ch = r["edgecad"], r["choices"][0]
                calls = ch["message"].get("tool_calls")
                print(f"{kind:<9} {st['n_tokens']:>3} tokens {st['tokens_per_second']:6.2f} tok/s  finish "
                      f"{ch['finish_reason']}  call {calls[0]['function'] if calls else None}", flush=True)


if __name__ == "__main__":
    main()
