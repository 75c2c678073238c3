"""The toy demo's recipes: one place for every hyper-parameter of `diffalign demo`.

Each function returns a plain config dict for an existing entry point (`diffalign train`,
`diffalign synpic`), with the paths of one demo output folder filled in. The demo writes them to
OUT/configs/ and runs them; `configs/toy_*.yaml` in the repository are the same recipes rendered for
`--out runs/demo` (regenerate with `python -m diffalign.toy.recipes --write configs`; a test checks they
match), so any step can be rerun by hand after a demo, e.g. `diffalign train configs/toy_dpo.yaml`.

Alignment (all full fine-tuning of the base, frozen-copy reference where the method needs one, 32 images
per step (16 pairs or 8 lists of 4), 200 steps, lr 1e-4, the same seed and data for every method). The lr
was measured: at 1e-5 nothing moved significantly, at 3e-4 DPO showed likelihood displacement and lost its
gain (docs/demo.md).
- dpo: Diffusion-DPO on (best, worst) pairs of each Syn-Pic group, beta 2000 (diffalign's convention,
  objectives/base.py);
- dpo_winner: the same plus winner_weight 500 x mean(e_w), an SFT term on the preferred image (RPO-style).
  Its gradient must be comparable to the DPO term's: the prototype (docs/toyworld.md) found weight 1 had
  no effect and 500 fixed the likelihood displacement plain DPO suffered there;
- mapo: MaPO's paper formula (beta 0.1), reference-free;
- rankdpo: RankDPO on the full k = 4 ranked lists (DCG-weighted pairwise DPO), beta 2000;
- dcpo: DCPO on the same pairs as dpo, each image captioned by what the toy reward reads in it
  (diffalign/toy/dual_captions.py), beta 2000 like dpo so that the captions are the only difference (DCPO's
  own default, 500, was tuned for SD 2.1 next to DPO's 5000);
- sft_winners: supervised fine-tuning on the best image of each pair;
- seppo: SePPO on the same winners, each against a sample drawn during training, from the same prompt, by a
  reference drawn from the run's own checkpoints (every align_steps / 8 steps, theta_0 included), with the
  anchor flip; beta 2000 like dpo. The sample is made with the demo's own sampler (DDIM sample_steps, no
  guidance), a whole micro-batch at a time (sampler.batch_size = pairs per step: faster than 1, and equal
  to it only up to float rounding, which the demo does not need);
- spo: SPO online from the Syn-Pic prompts, the toy reward on x0-hat as the step scorer (SPO_ROLLOUT below);
  its pairs are denoising transitions, 4 per step, not 32 images.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from diffalign.toy.base import BaseRecipe, train_config
from diffalign.toy.world import all_prompts

#: the demo's default output folder; the committed configs/toy_*.yaml are rendered for it
DEFAULT_OUT = "runs/demo"


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # for tables and plots
    objective: dict
    lr: float
    #: pairs: (best, worst) of each Syn-Pic row; lists: the full ranked list; dual_captions: those pairs, one
    #: caption per image (diffalign.toy.dual_captions); prompts: the Syn-Pic rows' prompts only (online methods)
    data: Literal["pairs", "lists", "dual_captions", "prompts"] = "pairs"
    note: str = ""
    #: the loser of each pair is sampled during training by the reference (experience.source generated)
    generated: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dpo", "DPO", {"name": "dpo", "beta": 2000.0}, 1e-4,
               note="plain Diffusion-DPO"),
        Method("dpo_winner", "DPO + winner term", {"name": "dpo", "beta": 2000.0, "winner_weight": 500.0}, 1e-4,
               note="DPO plus 500 x mean(e_w), which keeps the preferred image likely"),
        Method("mapo", "MaPO", {"name": "mapo"}, 1e-4, note="reference-free, paper formula"),
        Method("rankdpo", "RankDPO", {"name": "rankdpo", "beta": 2000.0}, 1e-4, data="lists",
               note="k = 4 ranked lists, DCG-weighted"),
        Method("dcpo", "DCPO", {"name": "dcpo", "beta": 2000.0}, 1e-4, data="dual_captions",
               note="DPO pairs, each image captioned by what it shows (DCPO-c, exact captioner)"),
        Method("sft_winners", "SFT on winners", {"name": "sft"}, 1e-4, note="the best image of each group"),
        Method("seppo", "SePPO", {"name": "seppo", "beta": 2000.0}, 1e-4, generated=True,
               note="the winners only, each against a sample by a reference drawn from earlier checkpoints"),
        Method("spo", "SPO", {"name": "spo"}, 1e-4, data="prompts",
               note="online: the model's own DDIM steps, 4 candidates per step scored by the toy reward on x0-hat"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class DemoRecipe:
    """Everything after the base: Syn-Pic data, alignment length, evaluation protocol."""

    base: BaseRecipe = field(default_factory=BaseRecipe)
    groups_per_prompt: int = 8  # Syn-Pic rows per prompt
    k: int = 4  # images per Syn-Pic row
    sample_steps: int = 10  # DDIM steps for the data and the evaluation
    guidance: float = 1.0  # no classifier-free guidance: the x0-predicting base is measured at 1 (docs/demo.md)
    align_steps: int = 200
    align_images: int = 32  # images per step: 16 pairs, or 8 ranked lists of k = 4 (RankDPO)
    eval_images_per_prompt: int = 32
    methods: tuple[str, ...] = tuple(METHODS)
    spo_threshold: float = 0.3  # SPO keeps a pair when the best and worst softmaxed scores differ by more


#: `diffalign demo --quick`: a smoke run of every stage in seconds (numbers mean nothing)
QUICK = DemoRecipe(
    base=BaseRecipe(width=8, steps=4, batch_size=8, warmup_steps=0, images=64),
    groups_per_prompt=1, k=2, sample_steps=2, align_steps=2, align_images=4, eval_images_per_prompt=2,
    spo_threshold=0.0,  # at 0.3 no rollout of the 4-step base kept a pair
)  # fmt: skip

#: the CI end-to-end test (tests/test_demo_e2e.py): the default base, data and protocol, and the two methods
#: that gained most in the measured runs (docs/demo.md)
CI = DemoRecipe(methods=("mapo", "dpo_winner"))

#: `diffalign demo --process flow`: the same world, data protocol and methods with a rectified-flow base (the
#: UNet predicts the velocity; training, Syn-Pic sampling and evaluation go through FlowMatchingProcess, Euler
#: steps instead of DDIM). Every hyper-parameter is the DDPM demo's (docs/demo.md has both tables)
FLOW = DemoRecipe(base=BaseRecipe(process="flow"))
QUICK_FLOW = replace(QUICK, base=replace(QUICK.base, process="flow"))
#: where each process's demo writes by default
DEFAULT_OUTS = {"ddpm": DEFAULT_OUT, "flow": "runs/demo_flow"}


def paths(out: str | Path) -> dict[str, str]:
    out = str(out).rstrip("/")
    return {
        "base": f"{out}/base",
        "synpic": f"{out}/synpic",
        "data": f"{out}/synpic/data",
        "dual_captions": f"{out}/synpic/dual_captions.parquet",
        "train": f"{out}/train",
        "eval": f"{out}/eval",
        "configs": f"{out}/configs",
        "base_inputs": f"{out}/base_inputs",
    }


def synpic_config(out: str | Path, r: DemoRecipe = DemoRecipe()) -> dict:
    """Toy Syn-Pic: each of the 18 prompts x groups_per_prompt rows of k base samples, ranked by the toy
    reward. Image seeds are seed + row * k + j (< 1_000_000, disjoint from the eval suite's)."""
    p = paths(out)
    return {
        "prompts": {"source": "toy", "repeats": r.groups_per_prompt},
        "generators": [{"type": "toy_sampler", "name": "base", "unet": p["base"], "size": r.base.size,
                        "images_per_prompt": r.k, "steps": r.sample_steps, "guidance": r.guidance,
                        "text_encoder_seed": r.base.text_encoder_seed}],  # fmt: skip
        "scorers": ["toy"],
        "seed": 0,
        "shard_size": 18 * r.groups_per_prompt,
        "output_dir": p["synpic"],
    }


#: SPO in the toy world: the SD1.5 recipe's resampler (4 candidates, threshold 0.3 in DemoRecipe.spo_threshold,
#: one trajectory for the first 20% of the steps: 2 of 10, in align_config) on the demo's sampler (DDIM with eta 1, no guidance),
#: 8 prompts per rollout, 4 kept pairs per step (a rollout keeps about 12, so it feeds about 3 steps, as the
#: reference's loop trains several steps on each rollout), the toy reward on x0-hat as the step scorer. Measured
#: against 16 pairs per step (one step per rollout) in docs/demo.md
SPO_ROLLOUT = {"scorer": "toy", "candidates": 4, "inner_steps": 0, "pairs_per_step": 4}
SPO_PROMPTS_PER_ROLLOUT = 8


def _align_data(m: Method, p: dict[str, str], r: DemoRecipe) -> dict:
    if m.data == "prompts":
        return {"format": "prompts", "source": p["data"], "caption_column": "prompt", "resolution": r.base.size}
    if m.data == "dual_captions":
        return {"format": "double_caption", "source": p["dual_captions"], "resolution": r.base.size}
    return {"format": "ranked", "source": p["data"], "resolution": r.base.size, "ranked_as_pairs": m.data == "pairs"}


def align_config(method: str, out: str | Path, r: DemoRecipe = DemoRecipe()) -> dict:
    m = METHODS[method]
    p = paths(out)
    batch = r.align_images // (r.k if m.data == "lists" else 2)
    online = {}
    if m.data == "prompts":  # batch = prompts per rollout
        online = {"experience": {"sampler": {"steps": r.sample_steps, "guidance": r.guidance, "eta": 1.0,
                                             "batch_size": SPO_PROMPTS_PER_ROLLOUT},
                                 # the last DDIM step is deterministic (final alpha 1: set_alpha_to_one): it gives no pairs
                                 "rollout": SPO_ROLLOUT | {"divert_start_step": min(2, r.sample_steps - 2),
                                                           "threshold": r.spo_threshold}}}
        batch = min(SPO_PROMPTS_PER_ROLLOUT, len(all_prompts()) * r.groups_per_prompt)
    cfg = {
        "model": {"pretrained": p["base"]},
        "data": _align_data(m, p, r),
        "objective": dict(m.objective),
        **online,
        "optim": {"lr": m.lr},
        "train": {"batch_size": batch, "max_steps": r.align_steps, "seed": 0},
        "logging": {"every": max(1, min(10, r.align_steps)), "tensorboard": False},
        "checkpoint": {"every": r.align_steps, "keep": 1},
        "output_dir": f"{p['train']}/{method}",
    }
    if m.generated:  # SePPO: the checkpoints are the reference pool's members
        cfg["experience"] = {"sampler": {"steps": r.sample_steps, "guidance": r.guidance, "batch_size": batch}}
        cfg["checkpoint"] = {"every": max(1, r.align_steps // 8), "keep": 1}
    return cfg


def base_config(out: str | Path, r: DemoRecipe = DemoRecipe()) -> dict:
    """The base's SFT config with its inputs under OUT/base_inputs (`python -m diffalign.toy.base --inputs`)."""
    p = paths(out)
    return train_config(r.base, f"{p['base_inputs']}/init", f"{p['base_inputs']}/sft.parquet", f"{p['train']}/base")


_HEADERS = {
    "toy_base": "The toy base model: SFT on renders with 35% corrupted captions, EMA weights (diffalign/toy/base.py).\n"
                "`diffalign demo` builds and caches it; to rerun by hand:\n"
                "  python -m diffalign.toy.base --inputs runs/demo/base_inputs && diffalign train configs/toy_base.yaml",
    "toy_synpic": "Toy Syn-Pic data from the demo's base model, ranked by the toy reward.\n"
                  "After `diffalign demo`: diffalign synpic configs/toy_synpic.yaml --overwrite",
}  # fmt: skip


def rendered(out: str | Path = DEFAULT_OUT, r: DemoRecipe = DemoRecipe()) -> dict[str, tuple[str, dict]]:
    """name -> (header comment, config) of every demo step, for the output folder `out`."""
    base_header = _HEADERS["toy_base"]
    if r.base.process != "ddpm":  # the inputs of a flow base
        base_header = base_header.replace("--inputs", f"--process {r.base.process} --inputs")
    docs = {"toy_base": (base_header, base_config(out, r)),
            "toy_synpic": (_HEADERS["toy_synpic"], synpic_config(out, r))}  # fmt: skip
    for name in r.methods:
        m = METHODS[name]
        head = (f"Toy world, {m.label}: {m.note} (diffalign/toy/recipes.py, docs/demo.md).\n"
                f"After `diffalign demo`: diffalign train configs/toy_{name}.yaml")  # fmt: skip
        docs[f"toy_{name}"] = (head, align_config(name, out, r))
    return docs


def to_yaml(header: str, config: dict) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    comment += "# Generated by `python -m diffalign.toy.recipes --write configs`; edit diffalign/toy/recipes.py.\n"
    return comment + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)


def write_configs(folder: str | Path, out: str | Path = DEFAULT_OUT, r: DemoRecipe = DemoRecipe()) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (header, cfg) in rendered(out, r).items():
        path = folder / f"{name}.yaml"
        path.write_text(to_yaml(header, cfg))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffalign.toy.recipes", description="write the toy demo's configs")
    p.add_argument("--write", required=True, help="folder to write toy_*.yaml into (the repository's: configs)")
    p.add_argument("--out", default=DEFAULT_OUT, help="the demo output folder the configs refer to")
    args = p.parse_args(argv)
    for path in write_configs(args.write, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

