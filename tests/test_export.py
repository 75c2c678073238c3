"""The final export: a LoRA diffusers loads at the strength it was trained at (alpha kept), a kohya /
ComfyUI copy, the model card, validation grids and pushing to the hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import tiny_config

VALIDATION = {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "steps": 3, "guidance": 5.0}


def _recorder():
    """An accelerate tracker that keeps what it is given (the interface every tracker implements)."""
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False
        tracker = None

        def __init__(self):
            super().__init__()
            self.config, self.logs, self.images = None, [], []

        def store_init_configuration(self, values):
            self.config = dict(values)

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, dict(values)))

        def log_images(self, values, step=None, **kwargs):
            self.images.append((step, {k: list(v) for k, v in values.items()}))

    return Recorder()


class Uploads:
    """huggingface_hub.HfApi's create_repo / upload_folder, recorded instead of sent (no network)."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/tester/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "files": files, **kwargs})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA run with alpha != rank (rank 4, alpha 16: scale 4), TensorBoard and a recording tracker,
    validation every 2 steps and --push-to-hub (uploads recorded), reused by the tests of its outputs."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from huggingface_hub import HfApi, constants

    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(tiny_config(tmp, lora={"rank": 4, "alpha": 16}, optim={"lr": 1e-2}, train={"max_steps": 2},
                                  validation={**VALIDATION, "every": 2}, logging={"every": 1, "tensorboard": True},
                                  checkpoint={"every": 1}, hub={"push": True, "model_id": "tiny-dpo"}))  # fmt: skip
    recorder, hub = _recorder(), Uploads()
    acc = Accelerator(cpu=True, log_with=["tensorboard", recorder],
                      project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/logs"))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
        mp.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
        trainer = Trainer(cfg, accelerator=acc)
        trainer.train()
    trainer.recorder, trainer.hub = recorder, hub
    return trainer


def _pipeline_with(final: Path | None, **load_kwargs):
    """The tiny base pipeline the run started from, with the exported LoRA loaded from `final` (None: none)."""
    from diffusers import DDIMScheduler

    from diffalign.backbones.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # validation samples with DDIM
    pipe.set_progress_bar_config(disable=True)
    if final is not None:
        pipe.load_lora_weights(str(final), **load_kwargs)
    return pipe


def _images(pipe) -> list[np.ndarray]:
    out = []
    for prompt in VALIDATION["prompts"]:
        for seed in VALIDATION["seeds"]:
            g = torch.Generator(device="cpu").manual_seed(seed)
            im = pipe(prompt, num_inference_steps=VALIDATION["steps"], guidance_scale=VALIDATION["guidance"],
                      height=32, width=32, generator=g).images[0]  # fmt: skip
            out.append(np.asarray(im))
    return out


def test_the_exported_lora_reproduces_the_trainers_validation_images_exactly(lora_run):
    from diffalign.training.export import validation_images

    trained = [np.asarray(im) for im in validation_images(lora_run, lora_run.acc.unwrap_model(lora_run.unet))]
    loaded = _images(_pipeline_with(lora_run.out / "final"))
    assert len(trained) == len(loaded) == 4
    for a, b in zip(trained, loaded):
        np.testing.assert_array_equal(a, b)
    # the LoRA is strong enough to matter, so the equality can fail
    base = _images(_pipeline_with(None))
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(trained, base)) > 0


def test_the_kohya_copy_loads_back_at_the_same_strength(lora_run):
    """final/lora_kohya.safetensors (AUTOMATIC1111 / ComfyUI key names, alpha tensors): diffusers reads it
    back through its own kohya conversion into the same images as the diffusers-format file."""
    from safetensors import safe_open

    final = lora_run.out / "final"
    with safe_open(str(final / "lora_kohya.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert alphas == {16.0} and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "16.0"
    diffusers_format = _images(_pipeline_with(final))
    kohya = _images(_pipeline_with(final, weight_name="lora_kohya.safetensors"))
    for a, b in zip(diffusers_format, kohya):
        np.testing.assert_array_equal(a, b)


def test_trackers_get_the_resolved_config_grouped_tags_and_the_validation_grid(lora_run):
    rec = lora_run.recorder
    # the resolved config, flattened, defaults included, plus derived hyper-parameters
    assert rec.config["objective.name"] == "dpo" and rec.config["objective.beta"] == 5000.0
    assert rec.config["lora.rank"] == 4 and rec.config["lora.alpha"] == 16 and rec.config["optim.lr"] == 0.01
    assert rec.config["run.effective_batch"] == 2 and rec.config["run.processes"] == 1
    assert all(isinstance(v, (bool, int, float, str)) for v in rec.config.values()), rec.config
    steps = [s for s, _ in rec.logs]
    assert steps == [1, 2]
    tags = set(rec.logs[0][1])
    assert {"train/loss", "train/implicit_acc", "train/lr", "train/grad_norm", "counters/skipped_items"} <= tags
    assert not [t for t in tags if "/" not in t], tags
    assert [s for s, _ in rec.images] == [2] and len(rec.images[0][1]["validation"]) == 1
    # metrics.jsonl keeps its flat keys (the demo reads them)
    line = json.loads((lora_run.out / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss" in line and "implicit_acc" in line and "train/loss" not in line


def test_tensorboard_events_hold_the_grouped_scalars_hparams_and_grid(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images, hparams = [], [], []
    for folder in {p.parent for p in (lora_run.out / "logs").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"images": 0})
        acc.Reload()
        scalars += acc.Tags()["scalars"]
        images += acc.Tags()["images"]
        hparams += [t for t, m in acc.summary_metadata.items() if m.plugin_data.plugin_name == "hparams"]
    assert "train/loss" in scalars and "train/lr" in scalars and "counters/skipped_items" in scalars
    assert images == ["validation"]
    assert "_hparams_/session_start_info" in hparams
    stored = yaml.safe_load(next((lora_run.out / "logs").rglob("hparams.yml")).read_text())
    assert stored["objective.beta"] == 5000.0 and stored["lora.alpha"] == 16.0


def test_the_validation_grid_shows_base_and_fine_tune_with_labels(lora_run):
    from PIL import Image

    from diffalign.training.export import validation_images

    png = Image.open(lora_run.out / "validation" / "step-0000002.png")
    info = dict(png.info)
    grid = png.convert("RGB")
    unet = lora_run.acc.unwrap_model(lora_run.unet)
    tuned = validation_images(lora_run, unet)
    from diffalign.training.reference import adapters_disabled

    with adapters_disabled(unet):
        base = validation_images(lora_run, unet)
    cell = tuned[0].size[0]
    # every base and fine-tuned image is in the grid, scaled up as a block of identical pixels
    arr = np.asarray(grid)
    for im in base + tuned:
        small = np.asarray(im)
        found = False
        for scale in (1, 2, 3, 4, 5, 6, 8):
            big = small.repeat(scale, 0).repeat(scale, 1)
            hits = _find(arr, big)
            if hits:
                found = True
                break
        assert found, "an image is missing from the grid"
    # and labels: the grid is larger than its images (a header and a prompt column), with text pixels
    assert grid.size[0] > 2 * len(VALIDATION["seeds"]) * cell and grid.size[1] > len(VALIDATION["prompts"]) * cell
    # the labels drawn on it travel in the PNG's text chunks too
    assert info["step"] == "2" and json.loads(info["rows"]) == VALIDATION["prompts"]
    assert json.loads(info["columns"]) == ["seed 0: base", "seed 0: step 2", "seed 1: base", "seed 1: step 2"]


def _find(haystack: np.ndarray, needle: np.ndarray) -> bool:
    h, w = needle.shape[:2]
    H, W = haystack.shape[:2]
    first = needle[0, 0]
    ys, xs = np.nonzero((haystack[: H - h + 1, : W - w + 1] == first).all(-1))
    return any(np.array_equal(haystack[y : y + h, x : x + w], needle) for y, x in zip(ys[:2000], xs[:2000]))


def test_push_to_hub_sends_checkpoints_and_the_final_export(lora_run):
    hub = lora_run.hub
    assert [r for r, _ in hub.repos] == ["tiny-dpo"]
    where = [u["path_in_repo"] for u in hub.uploads]
    assert where == ["last-checkpoint", "last-checkpoint", None]  # a checkpoint each step, then final/
    assert all(u["repo_id"] == "tester/tiny-dpo" for u in hub.uploads)
    assert "lora_0.safetensors" in hub.uploads[0]["files"] and "trainer_state.json" in hub.uploads[0]["files"]
    final = hub.uploads[-1]["files"]
    assert {"README.md", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "validation.png"} <= set(final)


def test_the_model_card(lora_run, tmp_path):
    from huggingface_hub import ModelCard

    final = lora_run.out / "final"
    text = (final / "README.md").read_text()
    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "diffusers" and "dpo" in card.data.tags
    for fact in ("rank 4", "alpha 16", "beta | 5000", "loss_type | sigmoid", "![validation](validation.png)"):
        assert fact in text, fact
    assert str(lora_run.out.parent) not in text and "/tmp" not in text  # no machine paths
    # the snippet runs: with the base id pointed at a local copy of the base and the repo at this folder
    from diffalign.backbones.tiny import save_tiny_pipeline

    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'load_lora_weights("tester/tiny-dpo")' in snippet
    base = save_tiny_pipeline(tmp_path / "base")
    code = snippet.replace("<base model>", str(base)).replace('"tester/tiny-dpo"', repr(str(final)))
    code = code.replace("image.save(", "image.size or print(")  # no file in the working folder
    namespace: dict = {}
    exec(compile(code, "README snippet", "exec"), namespace)
    assert namespace["image"].size == (32, 32)


@pytest.mark.parametrize("objective,base_note", [("dpo", "base (frozen reference)"), ("sft", "no base shown")])
def test_pixel_models_are_validated_beside_their_base(tmp_path, objective, base_note):
    """A pixel-space full fine-tune (the toy world's) samples its grid with diffalign.sampling; the base
    column comes from the frozen reference, and without one (SFT) the grid says so."""
    from dataclasses import replace

    from PIL import Image

    from diffalign.toy.base import QUICK_RECIPE, write_inputs
    from tests.helpers import run

    init, data = write_inputs(tmp_path / "inputs", replace(QUICK_RECIPE, images=16))
    cfg = tiny_config(tmp_path, model={"pretrained": str(init)}, lora=None, objective={"name": objective},
                      data={"format": "pickapic", "source": str(data), "resolution": 16}, train={"max_steps": 1},
                      validation={"every": 1, "prompts": ["a red circle"], "seeds": [0], "steps": 2})  # fmt: skip
    trainer = run(cfg)
    png = Image.open(trainer.out / "validation" / "step-0000001.png")
    assert base_note in png.info["title"]
    columns = json.loads(png.info["columns"])
    assert columns == (["seed 0: base", "seed 0: step 1"] if objective == "dpo" else ["seed 0: step 1"])
