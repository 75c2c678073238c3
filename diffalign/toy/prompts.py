"""Prompt sources of the toy world's evaluation suite (eval/suites/toyworld.yaml).

`eval_prompts()` gives the 18 single-object prompts of the default world, each with its colour and shape
as metadata. The suite file fixes the protocol (16 images per prompt, held-out seeds, DDIM + CFG)."""

from __future__ import annotations

from diffalign.toy.world import all_prompts, parse_prompt


def eval_prompts() -> list[dict]:
    """[{"prompt": "a red circle", "colour": "red", "shape": "circle"}, ...] in colour-major order."""
    out = []
    for p in all_prompts():
        (colour, shape), = parse_prompt(p)
        out.append({"prompt": p, "colour": colour, "shape": shape})
    return out
