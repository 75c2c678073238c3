"""The toy world's deliberately imperfect base model, built by the real trainer and cached on disk.

Recipe (`BaseRecipe`, docs/demo.md): a pixel-space UNet (diffalign.toy.model.build_unet) and the frozen
toy text encoder, a DDPM model predicting x0 or (`process="flow"`) a rectified-flow model predicting the
velocity, trained with `objective: sft` on freshly rendered images whose captions are corrupted
35% of the time (wrong colour or wrong shape, `world.corrupt_caption`) and dropped 10% of the time (the
data layer's `caption_dropout`, for classifier-free guidance), with EMA weights. It follows prompts about
half the time, which leaves room for preference alignment to show.

The SFT data is a Pick-a-Pic-schema parquet (caption, jpg_0, jpg_1, label_0, label_1): the `sft`
objective reads candidate 0 only, so jpg_1 repeats jpg_0's bytes and label_0 = 1. That keeps the data on
the ordinary, tested loader with no K=1 special case (the ranked loader needs K >= 2).

`ensure_base(recipe)` returns the model folder, training it on first use. Cache layout, keyed by a hash
of the recipe: $DIFFALIGN_CACHE (default ~/.cache/diffalign)/toy/base-<key>/
    init/           the randomly initialised pixel-family folder the trainer starts from
    sft.parquet     the rendered training data
    train/          the trainer's output (config.yaml, logs/metrics.jsonl, final/ = the base model)
    recipe.json     written last: its presence means the base is complete
It is built in base-<key>.tmp/ (inputs.json marks its inputs complete) and renamed when done. The training
checkpoints every tenth of its steps, so an interrupted build resumes from its last checkpoint (a resumed
run equals an uninterrupted one) instead of retraining from step 0.

`python -m diffalign.toy.base --inputs DIR` writes init/ and sft.parquet only (to rerun
configs/toy_base.yaml by hand); `python -m diffalign.toy.base` builds (or finds) the cached base.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: bump when the recipe's meaning changes without its fields changing (invalidates cached bases)
RECIPE_VERSION = 2
#: render seeds of the SFT data start here; disjoint from Syn-Pic's and the eval suite's sampling seeds
SFT_DATA_SEED_BASE = 50_000_000
PROCESSES = ("ddpm", "flow")


@dataclass(frozen=True)
class BaseRecipe:
    width: int = 16  # UNet block_out_channels (w, 2w, 4w)
    size: int = 16  # image side
    steps: int = 1000  # optimizer steps
    batch_size: int = 64
    lr: float = 3e-3
    lr_schedule: str = "linear"  # warmup, then linear decay to 0: the most quality for a short run
    warmup_steps: int = 50
    ema_decay: float = 0.99
    prediction_type: str = "sample"  # the DDPM denoiser's target: sample (x0) | epsilon | v_prediction
    #: ddpm: the 1000-step linear DDPM schedule; flow: rectified flow (the UNet predicts the velocity and
    #: prediction_type is unused), through the same FlowMatchingProcess as SD3 / FLUX
    process: str = "ddpm"
    corrupt_p: float = 0.35  # share of captions with a wrong colour or shape
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    images: int = 9600  # rendered (image, caption) rows; steps x batch_size / images = epochs
    seed: int = 0  # UNet init, data order and noise
    text_encoder_seed: int = 0

    def key(self) -> str:
        fields = asdict(self)
        if fields["process"] == "ddpm":  # the field came after the DDPM base was cached: its key stays
            del fields["process"]
        blob = json.dumps({"version": RECIPE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def __post_init__(self):
        if self.process not in PROCESSES:
            raise ValueError(f"toy base process must be one of {PROCESSES}, got {self.process!r}")


#: the demo's --quick smoke recipe: seconds, not a useful model
QUICK_RECIPE = BaseRecipe(width=8, steps=4, batch_size=8, warmup_steps=0, images=64)


def cache_root() -> Path:
    from diffalign.data.synthetic import cache_dir

    return Path(cache_dir()) / "toy"


def base_dir(recipe: BaseRecipe, root: str | Path | None = None) -> Path:
    return Path(root or cache_root()) / f"base-{recipe.key()}"


def model_dir(recipe: BaseRecipe, root: str | Path | None = None) -> Path:
    """Where the finished base model folder is (or will be)."""
    return base_dir(recipe, root) / "train" / "final"


# ---- inputs -------------------------------------------------------------------------------------------


def write_sft_data(path: str | Path, recipe: BaseRecipe) -> Path:
    """The SFT parquet: row i renders prompt i mod 18 with seed SFT_DATA_SEED_BASE + i; its caption is
    corrupted with probability corrupt_p (decided by numpy Generator([recipe.seed, i]))."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.toy.world import all_prompts, corrupt_caption, render_prompt

    prompts = all_prompts()
    captions, images = [], []
    for i in range(recipe.images):
        prompt = prompts[i % len(prompts)]
        buf = io.BytesIO()
        Image.fromarray(render_prompt(prompt, SFT_DATA_SEED_BASE + i, recipe.size)).save(buf, format="PNG")
        images.append(buf.getvalue())
        captions.append(corrupt_caption(prompt, np.random.default_rng([recipe.seed, i]), recipe.corrupt_p))
    table = pa.table({
        "caption": captions, "jpg_0": images, "jpg_1": images,
        "label_0": [1.0] * len(images), "label_1": [0.0] * len(images),
    })  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def build_init_backbone(recipe: BaseRecipe):
    """The untrained pixel-space backbone: random UNet, the frozen toy text encoder, the toy schedule (DDPM
    with the recipe's prediction type, or the flow-matching one)."""
    from diffalign.backbones.sd import PixelBackbone
    from diffalign.toy.model import build_flow_scheduler, build_scheduler, build_unet
    from diffalign.toy.text import build_text_encoder, build_tokenizer

    tok = build_tokenizer()
    te = build_text_encoder(tok, seed=recipe.text_encoder_seed)
    unet = build_unet(width=recipe.width, sample_size=recipe.size, seed=recipe.seed)
    if recipe.process == "flow":
        return PixelBackbone(unet, build_flow_scheduler(), te, tok, source="toy:init")
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(build_scheduler().config, prediction_type=recipe.prediction_type)
    return PixelBackbone(unet, scheduler, te, tok, source="toy:init")


def write_inputs(root: str | Path, recipe: BaseRecipe) -> tuple[Path, Path]:
    """init/ (a pixel-family folder) and sft.parquet under `root`."""
    root = Path(root)
    init = build_init_backbone(recipe).save_pretrained(root / "init")
    return init, write_sft_data(root / "sft.parquet", recipe)


def train_config(recipe: BaseRecipe, init: str | Path, data: str | Path, output_dir: str | Path) -> dict:
    """The `diffalign train` config of the base (plain dict; `diffalign.config.load_config` validates)."""
    every = max(1, min(50, recipe.steps))
    return {
        "model": {"pretrained": str(init)},
        "data": {"format": "pickapic", "source": str(data), "resolution": recipe.size,
                 "caption_dropout": recipe.caption_dropout},  # fmt: skip
        "objective": {"name": "sft"},
        "optim": {"lr": recipe.lr, "scheduler": recipe.lr_schedule, "warmup_steps": recipe.warmup_steps},
        "train": {"batch_size": recipe.batch_size, "max_steps": recipe.steps, "seed": recipe.seed,
                  "ema_decay": recipe.ema_decay},  # fmt: skip
        "logging": {"every": every, "tensorboard": False},
        # a tenth of the steps: an interrupted build resumes from there; checkpoints change no result
        "checkpoint": {"every": max(1, recipe.steps // 10), "keep": 1},
        "output_dir": str(output_dir),
    }


# ---- training ---------------------------------------------------------------------------------------


def train(config: dict, progress: bool = True, resume: str | None = None) -> dict:
    """Run the real Trainer on a config dict in this process; returns its last logged metrics."""
    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    cfg = load_config(config)
    cfg.logging.progress = cfg.logging.progress and progress
    return Trainer(cfg, resume=resume).train()


def ensure_base(recipe: BaseRecipe = BaseRecipe(), root: str | Path | None = None, log=print,
                progress: bool = True) -> Path:
    """The base model folder for `recipe`: from the cache, or trained now (and cached)."""
    final = base_dir(recipe, root)
    model = final / "train" / "final"
    if (final / "recipe.json").is_file() and (model / "model_index.json").is_file():
        log(f"toy base: cached at {model}")
        return model
    t0 = time.time()
    work = final.with_name(final.name + ".tmp")
    inputs = work / "inputs.json"
    if inputs.is_file():  # an interrupted build: its inputs are complete, its training resumes
        init, data = work / "init", work / "sft.parquet"
        log(f"toy base: resuming the interrupted build in {work}")
    else:
        log(f"toy base: not cached; training it ({recipe.steps} steps, batch {recipe.batch_size}) into {final}")
        shutil.rmtree(work, ignore_errors=True)
        init, data = write_inputs(work, recipe)
        inputs.write_text(json.dumps({"key": recipe.key()}))
    train(train_config(recipe, init, data, work / "train"), progress=progress, resume="latest")
    shutil.rmtree(work / "train" / "checkpoints", ignore_errors=True)  # optimizer state: not needed
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    # the trainer's config.yaml names the .tmp paths it ran from; point it at the cached ones
    cfg_file = final / "train" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace(str(work), str(final)))
    (final / "recipe.json").write_text(json.dumps({"key": recipe.key(), "version": RECIPE_VERSION,
                                                   "seconds": round(time.time() - t0, 1), **asdict(recipe)}, indent=1))  # fmt: skip
    log(f"toy base: trained in {time.time() - t0:.0f} s")
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffalign.toy.base", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", help="only write init/ and sft.parquet into this folder")
    p.add_argument("--process", choices=PROCESSES, default="ddpm", help="the base's noise process (default ddpm)")
    args = p.parse_args(argv)
    recipe = BaseRecipe(process=args.process)
    if args.inputs:
        init, data = write_inputs(args.inputs, recipe)
        print(f"wrote {init} and {data}")
    else:
        print(ensure_base(recipe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
