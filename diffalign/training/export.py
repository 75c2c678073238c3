"""What a run shows and hands over: labelled validation grids (base model beside the fine-tune), the final
export (diffusers LoRA + a kohya copy, or a full pipeline) with a model card, and pushing to the hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: the LoRA in kohya's key format (AUTOMATIC1111, ComfyUI, SD.Next), beside diffusers' own file
KOHYA_FILE = "lora_kohya.safetensors"
#: the last validation grid, copied into the export and shown by the model card
SAMPLES_FILE = "validation.png"
#: smallest side a grid cell is shown at (small images are scaled up by a whole factor, nearest neighbour)
MIN_CELL = 128


# ---- validation -------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_images(trainer, denoiser) -> list:
    """The config's validation prompts x seeds (prompt-major) sampled from `denoiser`: with the backbone's
    diffusers pipeline for latent models (DDIM, or the flow-matching pipeline's own Euler scheduler), with
    diffalign.sampling (the same sampler, the same seeds) for pixel-space models. PIL images."""
    cfg = trainer.cfg.validation
    bb = trainer.backbone
    res = cfg.resolution or trainer.cfg.data.resolution
    try:
        pipe = bb.pipeline(denoiser)
    except NotImplementedError:  # pixel-space: diffalign's own sampler
        from PIL import Image

        from diffalign.sampling import sample_images

        prompts = [p for p in cfg.prompts for _ in cfg.seeds]
        seeds = [s for _ in cfg.prompts for s in cfg.seeds]
        with trainer.autocast():
            arr = sample_images(bb, denoiser, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance, height=res)
        return [Image.fromarray(a) for a in arr]
    from diffusers import DDIMScheduler

    if bb.process.kind == "ddpm":  # flow-matching pipelines keep their own Euler scheduler
        pipe.scheduler = DDIMScheduler.from_config(bb.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in cfg.prompts:
        for seed in cfg.seeds:
            g = torch.Generator(device="cpu").manual_seed(seed)
            with trainer.autocast():
                images.append(pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                                   height=res, width=res, generator=g).images[0])  # fmt: skip
    return images


def base_images(trainer, denoiser) -> tuple[list | None, str]:
    """The base model's validation images (computed once per run: the base does not change) and what
    "base" is: the LoRA's model with its adapters off, or the frozen reference copy of a full fine-tune.
    (None, why) when there is none to show."""
    cached = getattr(trainer, "_base_validation", None)
    if cached is not None:
        return cached
    from diffalign.training.reference import FrozenCopyReference, adapters_disabled

    if trainer.cfg.lora is not None:
        with adapters_disabled(denoiser):
            out = (validation_images(trainer, denoiser), "base (LoRA off)")
    elif isinstance(trainer.reference, FrozenCopyReference):
        out = (validation_images(trainer, trainer.reference.module), "base (frozen reference)")
    else:
        out = (None, "no base shown: a full fine-tune without a frozen reference keeps no copy of the base")
    trainer._base_validation = out
    return out


def labelled_grid(cells: list, rows: int, cols: int, title: str, row_labels: list[str], col_labels: list[str]):
    """cells (row-major) as a grid (diffusers' make_image_grid) under a title and column labels, with a
    label column on the left; the labels are also stored as PNG text (`save_grid`)."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    w, h = cells[0].size
    scale = max(1, -(-MIN_CELL // min(w, h)))  # ceil
    if scale > 1:
        cells = [c.resize((w * scale, h * scale), Image.NEAREST) for c in cells]
        w, h = w * scale, h * scale
    block = make_image_grid(cells, rows=rows, cols=cols)
    font = ImageFont.load_default(size=14)
    line = 18
    left, top = 220, 2 * line + 8
    canvas = Image.new("RGB", (left + block.width, top + block.height), "white")
    canvas.paste(block, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), title, fill="black", font=font)
    for j, label in enumerate(col_labels):
        draw.text((left + j * w + 4, line + 6), _fit(draw, label, font, w - 8), fill="black", font=font)
    for i, label in enumerate(row_labels):
        for k, text in enumerate(_wrap(draw, label, font, left - 12, max(1, h // line))):
            draw.text((6, top + i * h + 4 + k * line), text, fill="black", font=font)
    return canvas


def _fit(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, lines[-1] + " …", font, width)
    return [_fit(draw, x, font, width) for x in lines]


@torch.no_grad()
def validation_grid(trainer, step: int) -> Path | None:
    """A labelled grid at the config's fixed prompts (rows) and seeds: per seed, the base model beside
    the fine-tune at this step. Saved to validation/step-N.png and sent to every tracker that takes images."""
    cfg = trainer.cfg.validation
    if not cfg.prompts:
        return None
    denoiser = trainer.acc.unwrap_model(trainer.unet)
    tuned = validation_images(trainer, denoiser)
    base, what = base_images(trainer, denoiser)
    if not trainer.acc.is_main_process:  # sharded weights: every rank sampled (collectives), rank 0 writes
        return None
    n = len(cfg.seeds)
    cells, columns = [], []
    for s in cfg.seeds:
        columns += ([f"seed {s}: base"] if base is not None else []) + [f"seed {s}: step {step}"]
    for i in range(len(cfg.prompts)):
        for j in range(n):
            cells += ([base[i * n + j]] if base is not None else []) + [tuned[i * n + j]]
    sampler = "DDIM" if trainer.backbone.process.kind == "ddpm" else "Euler"
    title = f"step {step}: {sampler} {cfg.steps} steps, guidance {cfg.guidance:g}; {what}"
    grid = labelled_grid(cells, len(cfg.prompts), len(columns), title, list(cfg.prompts), columns)
    out = trainer.out / "validation" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out, {"step": str(step), "title": title, "rows": json.dumps(list(cfg.prompts)),
                          "columns": json.dumps(columns)})  # fmt: skip
    log_grid(trainer.acc.trackers, grid, step)
    return out


def save_grid(grid, path: Path, text: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    grid.save(path, pnginfo=info)


def log_grid(trackers, grid, step: int) -> None:
    """The grid to every tracker with an image API (TensorBoard wants a batch array, wandb PIL images)."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        elif callable(getattr(tracker, "log_images", None)):
            tracker.log_images({"validation": [grid]}, step=step)


# ---- export -----------------------------------------------------------------------------------------------


def save_kohya_lora(path: Path, peft_layers: dict[str, torch.Tensor], prefix: str, peft_config) -> None:
    """Write a PEFT-format LoRA state dict in kohya's format with diffusers' converter, with each module's
    `.alpha` set to the trained lora_alpha (the converter writes the rank there, which loads at the wrong
    strength when alpha != rank)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    layers = {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in peft_layers.items()}
    kohya = convert_state_dict_to_kohya(layers)
    alpha = float(peft_config.lora_alpha)
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    meta = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(peft_config.r),
            "ss_network_alpha": str(alpha)}  # fmt: skip
    save_file(kohya, str(path), metadata=meta)


def export_final(trainer, metrics: dict, weights: dict | None = None) -> Path:
    """LoRA runs write `pytorch_lora_weights.safetensors` (loadable with `pipe.load_lora_weights(dir)`) and,
    for families that have one (Backbone.kohya_lora), its kohya copy; full runs write a complete diffusers
    pipeline folder (for pixel-space models the same layout without a VAE, which `load_backbone` reads
    back). Then the last validation grid, metrics.json and the model card (README.md); with hub.push, the
    folder is uploaded. `weights`: the whole trainable
    (LoRA) or model weights, gathered by every rank when they are sharded (training/distributed.py); None:
    read them from the model."""
    import shutil

    out = trainer.out / "final"
    out.mkdir(parents=True, exist_ok=True)
    unet = trainer.acc.unwrap_model(trainer.unet)
    bb = trainer.backbone
    if trainer.cfg.lora is not None:
        from peft.utils import get_peft_model_state_dict

        peft_layers = get_peft_model_state_dict(unet, state_dict=weights)
        peft_layers = {k: v.detach().float().contiguous().cpu() for k, v in peft_layers.items()}
        # the adapter's LoraConfig (rank, lora_alpha, targets) travels in the file's metadata: without it
        # diffusers assumes alpha = rank and loads the adapter at rank / alpha of its trained strength
        peft_config = unet.peft_config["default"]
        bb.save_lora(out, peft_layers, metadata=peft_config.to_dict())
        if bb.kohya_lora:
            save_kohya_lora(out / KOHYA_FILE, peft_layers, bb.lora_prefix, peft_config)
    else:
        if weights is not None:
            from diffalign.training.distributed import module_with

            unet = module_with(unet, weights)
        if unet.dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
            unet = unet.to(torch.float32)
        bb.save_pretrained(out, unet)
    grids = sorted((trainer.out / "validation").glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], out / SAMPLES_FILE)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    repo = hub_repo(trainer) if trainer.cfg.hub.push else None
    card = model_card(trainer.cfg, trainer.step, metrics, family=bb.family, repo_id=repo,
                      samples=SAMPLES_FILE if grids else None, kohya=bb.kohya_lora)  # fmt: skip
    card.save(out / "README.md")
    if repo is not None:
        push_folder(trainer, out, None, f"final export after step {trainer.step}")
    return out


# ---- the model card ---------------------------------------------------------------------------------------


def _is_hub_id(name: str | None) -> bool:
    """An `org/name` hub id, not a local path or a built-in (tiny:sd) model."""
    return bool(name) and name.count("/") == 1 and not name.startswith(("/", ".", "~")) and ":" not in name \
        and not Path(name).exists()  # fmt: skip


def _public(value: str | None) -> str | None:
    """A hub id or built-in model name as is; a local path reduced to its last part (no machine paths)."""
    if value is None or _is_hub_id(value) or ":" in value:
        return value
    return f"<local: {Path(value).name}>"


def public_config(cfg) -> dict:
    """The resolved config without machine paths: output and cache folders dropped, local model and data
    paths reduced to their last part."""
    tree = cfg.model_dump(mode="json")
    tree.pop("output_dir", None)
    tree.get("cache", {}).pop("dir", None)
    for section, key in (("model", "pretrained"), ("model", "vae"), ("data", "source")):
        tree[section][key] = _public(tree[section].get(key))
    return tree


def _snippet(cfg, family: str, repo_id: str | None) -> str:
    base = cfg.model.pretrained if _is_hub_id(cfg.model.pretrained) else "<base model>"
    here = repo_id or "<this folder>"
    v = cfg.validation
    prompt = v.prompts[0] if v.prompts else "a photo of a cat"
    call = f"image = pipe({prompt!r}, num_inference_steps={v.steps}, guidance_scale={v.guidance:g}).images[0]"
    head = ['import torch', 'from diffusers import DiffusionPipeline', '',
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            'dtype = torch.float16 if device == "cuda" else torch.float32']  # fmt: skip
    if family == "pixel":
        return "\n".join([
            "from diffalign.backbones import load_backbone", "from diffalign.sampling import sample_images", "",
            f'bb = load_backbone("{here}")',
            f"image = sample_images(bb, bb.denoiser, [{prompt!r}], [0], steps={v.steps}, guidance={v.guidance:g})[0]",
        ])  # fmt: skip
    if cfg.lora is not None:
        body = [f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=dtype).to(device)',
                f'pipe.load_lora_weights("{here}")']  # fmt: skip
    else:
        body = [f'pipe = DiffusionPipeline.from_pretrained("{here}", torch_dtype=dtype).to(device)']
    return "\n".join([*head, *body, call, 'image.save("sample.png")'])


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def model_card(cfg, step: int, metrics: dict, family: str, repo_id: str | None = None, samples: str | None = None,
               kohya: bool = True):  # fmt: skip
    """The export's README.md as a huggingface_hub ModelCard: metadata (base model, tags), a runnable
    inference snippet, what was trained (LoRA rank and alpha, the objective with every parameter,
    defaults included), the data, sample images, the final metrics and the config, without machine paths."""
    from huggingface_hub import ModelCard, ModelCardData

    import diffalign

    obj = cfg.objective
    base = cfg.model.pretrained
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image",
        base_model=base if _is_hub_id(base) else None,
        tags=["diffalign", obj.name, "text-to-image", "preference-alignment"] + (["lora"] if cfg.lora else []),
    )  # fmt: skip
    if cfg.lora is not None:
        lc = cfg.lora
        tuned = (f"LoRA rank {lc.rank}, alpha {_fmt(lc.alpha or lc.rank)} (scale {(lc.alpha or lc.rank) / lc.rank:g}), "
                 f"dropout {_fmt(lc.dropout)}; files: `pytorch_lora_weights.safetensors` (diffusers: "
                 f"`pipe.load_lora_weights`)")  # fmt: skip
        tuned += (f" and `{KOHYA_FILE}` (kohya format: AUTOMATIC1111, ComfyUI)" if kohya else
                  f" only: no kohya copy for {family} (diffusers' kohya converter covers the SD / SDXL UNet)")
    elif family == "pixel":
        tuned = "full fine-tune of a pixel-space model (unet/, text_encoder/, tokenizer/, scheduler/; no VAE)"
    else:
        tuned = "full fine-tune: a complete diffusers pipeline folder"
    params = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in obj.params().items())
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    t, o = cfg.train, cfg.optim
    import yaml

    config = yaml.safe_dump(public_config(cfg), sort_keys=False)
    body = f"""
# {obj.name} fine-tune of `{_public(base)}`

Trained with [diffalign](https://pypi.org/project/diffalign/) {diffalign.__version__} for {step} steps:
{tuned}.

## Use it

```python
{_snippet(cfg, family, repo_id)}
```

## Training

| | |
|---|---|
| base model | `{_public(base)}` |
| method | {obj.name} |
| data | {cfg.data.format} from `{_public(cfg.data.source)}`, resolution {cfg.data.resolution} |
| steps | {step} (batch {t.batch_size} per process x {t.grad_accum} accumulation) |
| optimizer | {o.optimizer}, lr {_fmt(o.lr)}{' (scaled by the batch)' if o.scale_lr else ''}, {o.scheduler} schedule, warm-up {o.warmup_steps} |
| precision | {t.mixed_precision}; seed {t.seed}; EMA {_fmt(t.ema_decay) if t.ema_decay else 'off'} |

Objective parameters (every one, defaults included):

| parameter | value |
|---|---|
{params}
"""
    if samples:
        body += f"""
## Samples

Validation prompts and seeds, base model beside the fine-tune:

![validation]({samples})
"""
    body += f"""
## Final training metrics (mean over the last logging window)

| metric | value |
|---|---|
{rows}

## Config (machine paths removed)

```yaml
{config}```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ---- the hub ----------------------------------------------------------------------------------------------


def hub_repo(trainer) -> str:
    """The hub repo this run pushes to (created on first use, kept on the trainer)."""
    repo = getattr(trainer, "_hub_repo", None)
    if repo is None:
        from huggingface_hub import HfApi, constants

        from diffalign.errors import UserError

        hc = trainer.cfg.hub
        name = hc.model_id or Path(trainer.cfg.output_dir).name
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"hub.push (--push-to-hub to {name!r}) needs the network, but HF_HUB_OFFLINE is set; "
                            "unset it or drop --push-to-hub")  # fmt: skip
        try:
            repo = HfApi().create_repo(name, private=hc.private, exist_ok=True).repo_id
        except Exception as err:  # HTTP errors (not logged in, no write access, a bad name), no connection
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"cannot create or open hub repo {name!r} ({first}); log in with `hf auth login` "
                            "(a token with write access), or set hub.model_id") from err  # fmt: skip
        trainer._hub_repo = repo
    return repo


def push_folder(trainer, folder: Path, path_in_repo: str | None, message: str) -> None:
    """Upload `folder` to the run's hub repo (under `path_in_repo`, replacing what was there)."""
    from huggingface_hub import HfApi

    HfApi().upload_folder(repo_id=hub_repo(trainer), folder_path=str(folder), path_in_repo=path_in_repo,
                          commit_message=message, delete_patterns="*" if path_in_repo else None)  # fmt: skip
