"""SD3 / SD3.5 and FLUX.1 backbones on tiny random models (CPU, offline): family detection, text conditioning
and sampling against the real diffusers pipelines, the training invariants, every objective's tiny recipe,
LoRA and full exports, the cache without T5, evaluation and Syn-Pic generation with LoRA exports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.backbones import load_backbone
from diffalign.backbones.tiny import save_tiny_pipeline, tiny_pipeline
from tests.helpers import (
    assert_states_close,
    crash_then_resume,
    launch,
    logged,
    run,
    tiny_config,
    trainable_state,
)

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sd3", "flux")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, family: str, **sections) -> dict:
    return tiny_config(tmp_path, model={"pretrained": f"tiny:{family}"}, **sections)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD3 and FLUX pipeline folders written by diffusers' save_pretrained (the real on-disk layout)."""
    root = tmp_path_factory.mktemp("flow_folders")
    return {f: save_tiny_pipeline(root / f, f) for f in FAMILIES}


@torch.no_grad()  # as the pipeline's __call__ (autograd picks other CPU kernels: differences of 1e-5)
def _pipeline_conditioning(pipe, family: str, prompt: str) -> dict:
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
    else:
        embeds, pooled, _ = pipe.encode_prompt(prompt, None)
    return {"prompt_embeds": embeds, "pooled": pooled}


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_detected_by_its_pipeline_class_and_t5_waits(folders, family):
    from diffalign.backbones.registry import detect_family

    assert detect_family(str(folders[family])).name == family  # not sdxl, though the folder has text_encoder_2
    bb = load_backbone(str(folders[family]))
    assert bb.family == family and bb.process.kind == "flow" and bb.lora_prefix == "transformer"
    assert not bb.t5.loaded
    before = bb.fingerprint()
    assert not bb.t5.loaded  # the fingerprint reads T5's files, not the model
    cond = bb.encode_text(["a red circle"])
    assert bb.t5.loaded and bb.fingerprint() == before
    from diffusers import DiffusionPipeline

    expected = _pipeline_conditioning(DiffusionPipeline.from_pretrained(str(folders[family])), family, "a red circle")
    for key, value in expected.items():  # the pipeline's own encode_prompt, from the same folder
        torch.testing.assert_close(cond[key], value, rtol=0, atol=0)
    targets = set(bb.lora_target_modules)
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= targets  # MMDiT's context projections
    names = {n.rsplit(".", 1)[-1] for n, _ in bb.denoiser.named_modules()}
    assert {"add_q_proj", "to_add_out", "to_q"} <= names


def test_sd3_without_t5_feeds_zeros_as_the_pipeline_does(folders):
    bb = load_backbone(str(folders["sd3"]), t5=False)
    assert bb.t5 is None and bb.fingerprint()["t5"] == "none"
    cond = bb.encode_text(["a blue square"])
    pipe = tiny_pipeline("sd3", t5=False)
    torch.testing.assert_close(cond["prompt_embeds"], _pipeline_conditioning(pipe, "sd3", "a blue square")["prompt_embeds"],
                               rtol=0, atol=0)  # fmt: skip
    assert cond["prompt_embeds"][:, -bb.max_sequence_length :].abs().max() == 0
    with_t5 = load_backbone(str(folders["sd3"])).fingerprint()
    assert with_t5["t5"] != "none"  # a cache built with T5 is refused without it, and the reverse


@pytest.mark.parametrize(("family", "guidance"), [("sd3", 4.0), ("flux", 3.5)])
def test_sampling_equals_the_diffusers_pipeline(family, guidance):
    """diffalign's sampler (process schedule, Euler step, FLUX's packing, ids, mu and guidance embedding,
    SD3's classifier-free guidance) gives the pipeline's latents for the same seed."""
    from diffalign.sampling import sample

    bb = load_backbone(f"tiny:{family}")
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    mine = sample(bb, bb.denoiser, ["a red circle", "a blue square"], [3, 4], steps=4, guidance=guidance,
                  height=32).latents  # fmt: skip
    theirs = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=guidance, height=32, width=32,
                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="latent").images  # fmt: skip
    if family == "flux":
        theirs = pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    other = sample(bb, bb.denoiser, ["a red circle", "a blue square"], [3, 4], steps=4, guidance=guidance + 2,
                   height=32).latents  # fmt: skip
    assert (other - mine).abs().max() > 1e-3  # guidance reaches the model (the comparison can fail)


def test_family_timestep_defaults_and_options_are_checked():
    assert load_backbone("tiny:sd3").process.density == "logit_normal"  # diffusers' SD3 scripts
    assert load_backbone("tiny:flux").process.density == "uniform"  # diffusers' FLUX script (--weighting_scheme none)
    bb = load_backbone("tiny:flux", flow={"density": "mode", "precondition_outputs": True})
    assert bb.process.density == "mode" and bb.process.precondition_outputs
    with pytest.raises(ValueError, match="model.flow applies to flow-matching models"):
        load_backbone("tiny:sd", flow={"density": "uniform"})
    with pytest.raises(ValueError, match="model.t5 applies to sd3 models, not flux"):
        load_backbone("tiny:flux", t5=False)
    with pytest.raises(ValueError, match="model.guidance_embedding applies to flux models, not sd"):
        load_backbone("tiny:sd", guidance_embedding=1.0)
    with pytest.raises(ValueError, match="velocity"):
        load_backbone("tiny:sd3", prediction_type="epsilon")


def test_flux_guidance_embedding_in_training_and_schnell():
    from diffalign.backbones.flux import DEFAULT_TRAIN_GUIDANCE, FluxBackbone
    from diffalign.backbones.t5 import LazyModule
    from diffalign.backbones.tiny import tiny_flux_components

    seen = []
    bb = load_backbone("tiny:flux")
    bb.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    x, cond = torch.randn(2, 16, 8, 8), bb.encode_text(["a", "b"])
    bb.predict(bb.denoiser, x, torch.tensor([500.0, 20.0]), cond)
    assert seen[-1].tolist() == [DEFAULT_TRAIN_GUIDANCE] * 2  # diffusers' FLUX LoRA script's 3.5
    assert load_backbone("tiny:flux", guidance_embedding=1.0).train_guidance == 1.0
    c = tiny_flux_components(guidance_embeds=False)  # schnell: no guidance embedding
    schnell = FluxBackbone(c["transformer"], c["scheduler"], c["text_encoder"], c["tokenizer"],
                           LazyModule.of(c["text_encoder_2"]), c["tokenizer_2"], c["vae"])  # fmt: skip
    out = schnell.guided_prediction(schnell.denoiser, x, torch.tensor(500.0), cond, None, 5.0)
    torch.testing.assert_close(out, schnell.predict(schnell.denoiser, x, torch.tensor(500.0), cond))
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxBackbone(c["transformer"], c["scheduler"], c["text_encoder"], c["tokenizer"],
                     LazyModule.of(c["text_encoder_2"]), c["tokenizer_2"], c["vae"], guidance_embedding=3.5)  # fmt: skip


def test_precondition_outputs_is_a_sigma_squared_weighted_velocity_error():
    from diffalign.training.experience import mse_energy

    plain = load_backbone("tiny:sd3")
    pre = load_backbone("tiny:sd3", flow={"precondition_outputs": True})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    t = torch.tensor([900.0, 500.0, 100.0])
    cond = plain.encode_text(["a", "b"] * 3)
    e_plain = mse_energy(plain, plain.denoiser, x0, noise, t, cond)
    e_pre = mse_energy(pre, pre.denoiser, x0, noise, t, cond)
    sigma = (t / 1000).view(3, 1)
    torch.testing.assert_close(e_pre, sigma**2 * e_plain, rtol=1e-4, atol=1e-7)


# ---- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulation_equals_batch_and_resume_equals_uninterrupted(tmp_path, family, monkeypatch):
    a = run(_cfg(tmp_path / "a", family, train={"batch_size": 4, "grad_accum": 1, "max_steps": 1}))
    b = run(_cfg(tmp_path / "b", family, train={"batch_size": 1, "grad_accum": 4, "max_steps": 1}))
    assert_states_close(trainable_state(a), trainable_state(b), atol=1e-6, rtol=0)
    c = run(_cfg(tmp_path / "c", family, train={"batch_size": 4, "grad_accum": 1, "max_steps": 1, "seed": 1}))
    with pytest.raises(AssertionError):
        assert_states_close(trainable_state(a), trainable_state(c), atol=1e-6, rtol=0)

    common = dict(train={"max_steps": 3}, checkpoint={"every": 2}, optim={"scheduler": "linear", "warmup_steps": 1})
    full = run(_cfg(tmp_path / "full", family, **common))
    part = _cfg(tmp_path / "part", family, **common)
    resumed = crash_then_resume(part, 2, monkeypatch)
    assert [x["step"] for x in logged(part)] == [1, 2, 3]
    assert_states_close(trainable_state(full), trainable_state(resumed), atol=1e-7, rtol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_batch_sd3(tmp_path):
    """One family (SD3, the richer conditioning) under a real 2-process gloo DDP run against one process (run
    in this process: one subprocess start less); FLUX shares the trainer path and its invariants are checked
    in-process above."""
    one = _cfg(tmp_path / "one", "sd3", train={"batch_size": 2, "max_steps": 1})
    two = _cfg(tmp_path / "two", "sd3", train={"batch_size": 1, "max_steps": 1})
    run(one)
    launch(two, 2, tmp_path)
    a = load_file(str(Path(one["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(two["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    assert_states_close(a, b, atol=1e-6, rtol=0)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_training_equals_uncached_and_never_loads_t5(tmp_path, folders, family, monkeypatch):
    """From a model folder: the cache is built with T5; training from it reads T5's conditioning from the
    shards and accepts the cache by T5's file digest, with T5EncoderModel.from_pretrained made to fail."""
    from transformers import T5EncoderModel

    from diffalign.config import load_config
    from diffalign.training.cache import build_cache

    common = dict(model={"pretrained": str(folders[family])}, train={"max_steps": 2, "batch_size": 4},
                  data={"caption_dropout": 0.5, "random_flip": True})  # fmt: skip
    plain = run(tiny_config(tmp_path / "plain", **common))
    cfg = tiny_config(tmp_path / "cached", cache={"enabled": True, "dtype": "fp32"}, **common)
    build_cache(load_config(cfg), device="cpu")

    def no_t5(*args, **kwargs):
        raise AssertionError("T5 was loaded while training from the cache")

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", no_t5)
    cached = run(cfg)
    assert not cached.backbone.t5.loaded
    for a, b in zip(logged(plain.cfg.model_dump()), logged(cached.cfg.model_dump()), strict=True):
        for key in ("err_w", "err_l", "ref_err_w", "ref_err_l"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), (a["step"], key)
    assert_states_close(trainable_state(plain), trainable_state(cached), atol=1e-4, rtol=0)


def _recipes() -> list[str]:
    return [f"tiny_{f}_{o}" for f in FAMILIES for o in ("dpo", "mapo", "sft", "dcpo", "rankdpo")]


@pytest.mark.parametrize("recipe", _recipes())
def test_tiny_flow_recipe_trains_checkpoints_resumes_and_exports(recipe, tmp_path, monkeypatch):
    from diffalign.config import load_config

    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml",
                      [f"output_dir={tmp_path / recipe}", "logging.tensorboard=false", "train.max_steps=2",
                       "checkpoint.every=1"]).model_dump(mode="json")  # fmt: skip
    trainer = crash_then_resume(cfg, 1, monkeypatch)
    out = Path(cfg["output_dir"])
    lines = logged(cfg)
    assert [x["step"] for x in lines] == [1, 2] and trainer.step == 2
    assert (out / "checkpoints" / "step-0000001").is_dir() and (out / "checkpoints" / "latest").is_file()
    assert (out / "final" / "README.md").is_file()
    if recipe.endswith("_dpo"):
        assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA at init: policy == reference
        assert (out / "validation" / "step-0000002.png").is_file()  # the family's pipeline made the grid
    if cfg["lora"] is not None:
        keys = load_file(str(out / "final" / "pytorch_lora_weights.safetensors")).keys()
        assert keys and all(k.startswith("transformer.") for k in keys)
        assert any("add_q_proj" in k for k in keys) and any(".to_q." in k for k in keys)
    else:  # a full run exports a pipeline folder that reloads with the trained weights
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(out / "final"))
        assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[recipe.split("_")[1]]
        reloaded = dict(pipe.transformer.named_parameters())
        for name, p in trainable_state(trainer).items():
            torch.testing.assert_close(reloaded[name].detach(), p, msg=name)
        assert load_backbone(str(out / "final")).family == recipe.split("_")[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_loads_into_the_pipeline_eval_and_synpic(tmp_path, folders, family):
    """The exported LoRA (alpha != rank) changes the real pipeline's output and loads at its trained scale;
    `diffalign eval`'s generator and the Syn-Pic diffusers generator load it too and make the same image.
    No kohya copy is written for these families, and the model card says so."""
    from diffalign.sampling.generators import ModelLoadError, load_pipeline, make_generator
    from diffalign.synpic.generators import diffusers_generator
    from diffalign.training.export import KOHYA_FILE

    trainer = run(_cfg(tmp_path / "run", family, optim={"lr": 1e-2}, train={"max_steps": 2},
                       lora={"rank": 4, "alpha": 16}))  # fmt: skip
    final = trainer.out / "final"
    assert not (final / KOHYA_FILE).exists()
    assert f"no kohya copy for {family}" in (final / "README.md").read_text()
    guidance = {"sd3": 4.0, "flux": 3.5}[family]

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, guidance_scale=guidance, height=32, width=32, generator=g,
                    output_type="np").images[0]  # fmt: skip

    pipe = tiny_pipeline(family)
    base = image(pipe)
    pipe.load_lora_weights(str(final))
    tuned = image(pipe)
    assert abs(tuned - base).max() > 1e-3
    # every trained tensor arrives, the context projections' included (a key set mixing diffusers' and
    # peft's formats was measured to load 14 of SD3's 38)
    loaded = {n.replace(".default_0.", ".default."): p for n, p in pipe.transformer.named_parameters() if "lora" in n}
    trained = trainable_state(trainer)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[n], p) for n, p in trained.items())
    scales = {m.scaling["default_0"] for m in pipe.transformer.modules() if hasattr(m, "scaling") and m.scaling}
    assert scales == {4.0}  # alpha 16 / rank 4, from the export's metadata (without it diffusers assumes 1)

    import numpy as np

    kw = dict(steps=3, guidance=guidance, height=32, width=32)
    evaluated = make_generator(str(folders[family]), lora=str(final), **kw)(["a red circle"], [0])[0]
    synpic = diffusers_generator(str(folders[family]), lora=str(final), steps=3, guidance=guidance, resolution=32,
                                 device="cpu").generate(["a red circle"], [0])[0]  # fmt: skip
    expected = (tuned * 255).round().astype("uint8")
    assert np.abs(np.asarray(evaluated).astype(int) - expected).max() <= 1
    assert np.abs(np.asarray(synpic).astype(int) - expected).max() <= 1
    with pytest.raises(ModelLoadError, match="flow-matching pipeline"):
        load_pipeline(str(folders[family]), sampler="ddim")


def test_built_in_models_pass_the_preflight():
    """tiny:, random: and small: models are built in code: the preflight reads no model_index.json for them
    (scripts/bench_train.py trains small:sd3 / small:flux on a CPU), while an unknown hub id is refused."""
    from diffalign.backbones.registry import BUILDER_KINDS, ModelNotFound
    from diffalign.config import ModelConfig
    from diffalign.training.preflight import check_model

    for kind in BUILDER_KINDS:
        check_model(ModelConfig(pretrained=f"{kind}:sd3"))
    with pytest.raises(ModelNotFound, match="offline"):
        check_model(ModelConfig(pretrained="nobody/no-such-model"))


def test_flow_recipes_and_bench_configs_load():
    """Every shipped SD3 / SD3.5 / FLUX recipe validates (the models are not downloaded)."""
    from diffalign.config import load_config

    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                   if p.name.startswith(("sd3", "sd35", "flux", "bench_sd3", "bench_flux")))  # fmt: skip
    assert len(names) >= 6, names
    for name in names:
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.model.pretrained.startswith(("stabilityai/", "black-forest-labs/", "random:", "small:")), name


def test_spo_resampler_takes_the_family_schedule():
    """SPO's step-wise resampler (and so the rollout source) schedules FLUX's steps as the sampler does: the
    pipeline's sigmas and dynamic shift mu, without which FLUX's scheduler refuses to schedule."""
    from diffalign.sampling.loop import sampling_schedule
    from diffalign.sampling.resample import resample

    bb = load_backbone("tiny:flux")
    scores = []

    def scorer(images, prompts, t):
        scores.append(t)
        return images.mean(dim=(1, 2, 3))

    pairs = resample(bb, bb.denoiser, ["a red circle"], [0], scorer, steps=3, guidance=3.5, eta=0.7, divert_start=1,
                     candidates=2, threshold=0.0, height=32, width=32)  # fmt: skip
    assert len(pairs) == pairs.kept >= 1
    times = {float(t) for step in sampling_schedule(bb, 3, 32, 32) for t in step}
    assert {float(t) for ts in scores for t in ts} <= times  # scored at the family's (shifted) times


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_experience_samples_with_the_family_schedule(tmp_path, family):
    """SPIN-Diffusion-style DPO (the reference samples the loser during training) on both families: the
    sampler takes the family's schedule (FLUX: sigmas and mu) and guidance (FLUX: the embedding)."""
    trainer = run(_cfg(tmp_path, family, train={"max_steps": 1, "batch_size": 1},
                       experience={"source": "generated", "sampler": {"steps": 2, "guidance": 3.0}}))  # fmt: skip
    line = logged(trainer.cfg.model_dump())[0]
    assert trainer.source.kind == "generated" and line["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert line["err_l"] != line["err_w"]
