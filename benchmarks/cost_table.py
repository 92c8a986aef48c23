"""Print the cost table of docs/accounting.md: prefill FLOPs and KV-cache bytes of every method at 576 / 192 / 128 / 64 tokens.

Computed by reducers.accounting from the written-out LLaVA-1.5-7B config and each method's schedule
(`reducers.schedule`: the per-layer token counts the runtime would produce for one image), no model run.
Assumptions: one 336-px image (576 visual tokens at full count), a 40-token text prompt (BOS, chat template and a
short question), batch 1, fp16 cache.

    .venv/bin/python -m benchmarks.cost_table
"""
from __future__ import annotations

import argparse

import reducers
from reducers.accounting import (ModelDims, kv_bytes, model_dims, prefill_flops, projector_flops, reference_config,
                                 vision_tower_flops)

BUDGETS = (576, 192, 128, 64)
FP16_BYTES = 2


def prefill_cost(config, dims: ModelDims, method: str, budget: int, prompt_tokens: int) -> tuple[int, int, int]:
    """(vision tower + projector FLOPs, LLM prefill FLOPs, KV bytes after prefill) of one image and prompt."""
    schedule = (reducers.schedule(config, method, visual_tokens=budget) if reducers.takes_budget(method)
                else reducers.schedule(config, method))
    vision = (vision_tower_flops(dims.vision, schedule["vision_tokens_per_layer"], num_crops=1)
              + projector_flops(dims.projector, dims.projected_per_crop))
    # Each decoder layer processes the prompt plus its visual tokens; its cache holds those (or fewer, if a later
    # layer cut the earlier caches too).
    tokens_per_layer = [prompt_tokens + visual for visual in schedule["visual_tokens_per_layer"]]
    entries_per_layer = [prompt_tokens + visual for visual in schedule["visual_entries_per_layer"]]
    return vision, prefill_flops(dims.text, tokens_per_layer), kv_bytes(dims.text, entries_per_layer, FP16_BYTES)


def markdown_table(config_name: str, prompt_tokens: int) -> str:
    config = reference_config(config_name)
    dims = model_dims(config)
    methods = ["none"] + [name for name in reducers.available() if name != "none"]
    header = ["method"] + [f"{budget}: TFLOPs (vision + LLM)" for budget in BUDGETS] + [
        f"{budget}: KV MB" for budget in BUDGETS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        budgets = BUDGETS if reducers.takes_budget(method) else BUDGETS[:1]  # full count only
        costs = [prefill_cost(config, dims, method, budget, prompt_tokens) for budget in budgets]
        flops = [f"{(vision + llm) / 1e12:.2f} ({vision / 1e12:.2f} + {llm / 1e12:.2f})" for vision, llm, _ in costs]
        cache = [f"{kv / 1e6:.0f}" for _, _, kv in costs]
        blank = ["—"] * (len(BUDGETS) - len(budgets))
        lines.append("| " + " | ".join([method] + flops + blank + cache + blank) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="llava-1.5-7b", help="a config in reducers/configs/")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="text tokens in the prompt")
    args = parser.parse_args()
    print(markdown_table(args.config, args.prompt_tokens))


if __name__ == "__main__":
    main()
