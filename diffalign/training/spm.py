"""`diffalign train-spm CONFIG`: train SPO's step-aware preference model (diffalign/rewards/spm.py) on
preference pairs, through the trainer's data, cache, checkpoint, resume and logging code.

Reference: RockeyCoss/SPO `step_aware_preference_model/` (trainer/tasks/spm_task.py `train_step`,
trainer/criterions/spm_criterion.py). Per pair:

1. t ~ U{0, ..., 999}; both images' VAE latents are noised with the SAME noise at t;
2. one classifier-free-guided prediction (scale 5, the empty prompt) of the frozen diffusion model gives each
   image's x0-hat, decoded to pixels;
3. the SPM scores both decoded x0-hat at t against the caption: s = exp(logit_scale) cos(image, text);
4. PickScore's loss: the cross-entropy of softmax(s_0, s_1) against the pair's soft labels (1, 0) or, for
   a tie, (0.5, 0.5), plus log 0.5 for a tie so that a perfect fit of a tie costs 0.

The SDXL SPM relabels every pair with PickScore on its two images first (`spm.relabel: pickscore`): a win when
the softmax of the two PickScores differs by more than 0.1, else a tie.

The trainer's timestep, noise and VAE-posterior draws (diffalign.training.experience.item_noise) key each
pair's randomness on (seed, its position in the data stream), so accumulation, N processes and resume
replay the same run, as for `diffalign train`.

Departures from the reference, each documented in docs/spo.md: pairs are weighted equally (the reference
weights a pair by 1 / the pairs of its prompt in the dataset, normalised over the batch); relabelling reads
the training crop, not the stored full-size image; no evaluation at fixed timesteps (the train accuracy is
logged instead).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffalign.config import SPMConfig
from diffalign.errors import cli_entry
from diffalign.training.reference import Reference
from diffalign.training.trainer import Trainer


def preference_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PickScore's criterion (spm_criterion.py, no in-batch negatives): scores [B, 2], labels [B, 2] summing
    to 1; per pair -(l_0 log p_0 + l_1 log p_1) + [l_0 == l_1] log 0.5 with p = softmax(scores); the mean."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    loss = -(labels * logp).sum(-1) + (labels[:, 0] == labels[:, 1]).float() * math.log(0.5)
    return loss.mean()


def pickscore_labels(scores: torch.Tensor, tie_threshold: float) -> torch.Tensor:
    """spm_task.py `update_as_pickscore_label`: (1, 0) when p_0 - p_1 > threshold, (0, 1) when p_1 - p_0 >
    threshold, else (0.5, 0.5); p = softmax of the two PickScores."""
    p = torch.softmax(scores.float(), dim=-1)
    labels = torch.full_like(p, 0.5)
    labels[p[:, 0] - p[:, 1] > tie_threshold] = torch.tensor([1.0, 0.0])
    labels[p[:, 1] - p[:, 0] > tie_threshold] = torch.tensor([0.0, 1.0])
    return labels


class SPMTrainer(Trainer):
    """The trainer's loop, checkpoints and logs around a different model: the SPM trains (all of it), the
    diffusion model is frozen and only predicts x0-hat."""

    cfg: SPMConfig

    pushes_to_hub = False  # an SPM config has no hub section

    def _init_objective(self) -> None:
        self.objective, self.objective_params = None, {}

    def _objective_state(self) -> dict:
        return {"name": "spm"}

    def _build(self) -> None:
        from diffalign.backbones.registry import backbone_from_config
        from diffalign.rewards.spm import build_spm_model, load_spm_weights
        from diffalign.training.experience import OfflineSource

        cfg, acc, mc, sc = self.cfg, self.acc, self.cfg.model, self.cfg.spm
        self.backbone = bb = backbone_from_config(mc)
        bb.denoiser.requires_grad_(False).eval()
        bb.place(acc.device, self.weight_dtype, mc.vae_fp32)
        bb.denoiser.to(acc.device)
        if next(bb.denoiser.parameters()).dtype != self.weight_dtype:  # diffusers warns on any cast
            bb.denoiser.to(self.weight_dtype)
        spm, self.tokenizer, processor = build_spm_model(sc.clip, sc.processor, tiny=sc.tiny, seed=cfg.train.seed)
        if sc.init:
            load_spm_weights(spm, sc.init)
        spm.float().to(acc.device).requires_grad_(True).train()
        self.image_size = int(processor.size["shortest_edge"])
        self.image_mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.image_std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        self.relabeler = None
        if sc.relabel == "pickscore":
            from diffalign.rewards import create_scorer

            self.relabeler = create_scorer("pickscore", model=sc.clip, processor=sc.processor, tiny=sc.tiny,
                                           seed=cfg.train.seed, device=acc.device)  # fmt: skip
        self.reference = Reference()
        self.params = [p for p in spm.parameters() if p.requires_grad]
        self.dataset = self._dataset()
        self.global_batch = cfg.train.batch_size * acc.num_processes
        self.lr = cfg.optim.lr * (self.global_batch * cfg.train.grad_accum if cfg.optim.scale_lr else 1)
        optimizer = self._optimizer()
        self.unet, self.optimizer, self.scheduler = acc.prepare(spm, optimizer, self._lr_scheduler(optimizer))
        self._save_kwargs, self._load_kwargs = {}, {}  # accelerate's own checkpoint of the whole SPM
        self.params = [p for p in acc.unwrap_model(self.unet).parameters() if p.requires_grad]
        # the data side of a pair (its latents, timestep, noise) exactly as offline training draws it
        self.pairs = OfflineSource(bb, seed=cfg.train.seed, resolution=cfg.data.resolution, device=acc.device,
                                   dtype=self.weight_dtype, global_batch=self.global_batch,
                                   local_batch=cfg.train.batch_size, rank=acc.process_index, candidates=2)  # fmt: skip
        self.source = None
        self.ema = None

    @torch.no_grad()
    def x0_hat_pixels(self, batch: dict, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP-normalised pixels of both images' decoded x0-hat [B, 2, 3, S, S], their timesteps [B])."""
        from diffalign.rewards.spm import spm_tensor_pixels
        from diffalign.sampling.loop import guided_output
        from diffalign.training.experience import item_noise

        bb, src = self.backbone, self.pairs
        B = batch["phi"].shape[0]
        t, noise, eps = item_noise(bb.process, src.seed, src.positions(micro, B), 2, src._latent_shape(batch))
        x0 = src.latents(batch, 2, eps).flatten(0, 1)  # [2B, ...] image 0, image 1 of each pair
        t2 = t.to(self.acc.device).repeat_interleave(2)
        noisy = bb.process.add_noise(x0, noise.to(x0.device).repeat_interleave(2, dim=0), t2)
        # the text of the caption, with the sampler's micro-conditioning (SDXL: the target size, no crop), as the
        # reference's fixed add_time_ids; the empty prompt for the guidance's unconditional branch
        size = self.cfg.data.resolution
        micro_cond = {k: v.to(self.acc.device) for k, v in bb.sampling_conditioning(2 * B, size, size).items()}
        cond = src.conditioning(batch, 2) | micro_cond
        uncond = {k: v.to(self.acc.device, self.weight_dtype) for k, v in bb.empty_conditioning(2 * B).items()}
        with self.acc.autocast():
            pred = guided_output(bb, bb.denoiser, noisy.to(self.weight_dtype), t2, cond, uncond | micro_cond,
                                 self.cfg.spm.guidance)  # fmt: skip
        x0_hat = bb.process.pred_x0(pred.float(), t2, noisy.float())
        images = bb.decode(x0_hat.to(self.weight_dtype)).float()  # [-1, 1]
        pixels = spm_tensor_pixels(images / 2 + 0.5, self.image_size, self.image_mean, self.image_std)
        return pixels.view(B, 2, *pixels.shape[1:]), t

    def compute_loss(self, batch: dict, micro: int):
        pixels, t = self.x0_hat_pixels(batch, micro)
        B = pixels.shape[0]
        labels = batch["phi"].to(self.acc.device, torch.float32)
        if self.relabeler is not None:
            originals = (batch["pixel_values"][:, :2].flatten(0, 1).float() / 2 + 0.5).clamp(0, 1)
            captions = [item[0] for item in batch["captions"] for _ in range(2)]
            labels = pickscore_labels(self.relabeler.score(originals, captions).view(B, 2), self.cfg.spm.tie_threshold)
            labels = labels.to(self.acc.device)
        texts = [item[0] for item in batch["captions"]]
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.acc.device)
        with self.acc.autocast():  # one forward of the prepared model: both towers
            image, text = self.unet(pixels.flatten(0, 1).float(), t.to(self.acc.device).float().repeat_interleave(2),
                                    tok["input_ids"], tok["attention_mask"])  # fmt: skip
        inner = self.acc.unwrap_model(self.unet)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        image = torch.nn.functional.normalize(image.float(), dim=-1).view(B, 2, -1)
        scores = inner.logit_scale.exp().float() * (image * text[:, None]).sum(-1)
        loss = preference_cross_entropy(scores, labels)
        decided = labels[:, 0] != labels[:, 1]
        right = ((scores[:, 0] > scores[:, 1]) == (labels[:, 0] > labels[:, 1])).float()
        metrics = {
            "accuracy": (right[decided].mean() if decided.any() else torch.tensor(0.5)).detach(),
            "ties": (~decided).float().mean(),
            "score_gap": (scores[:, 0] - scores[:, 1]).detach().abs().mean(),
            "t_mean": t.float().mean(),
        }
        return loss, metrics

    def summary(self) -> str:
        cfg, acc = self.cfg, self.acc
        n = sum(p.numel() for p in self.params)
        eff = self.global_batch * cfg.train.grad_accum
        return "\n".join([
            f"diffalign train-spm: the step-aware preference model on x0-hat of {cfg.model.pretrained} ({self.backbone.family})",
            f"  spm         from {cfg.spm.init or cfg.spm.clip}{' (tiny)' if cfg.spm.tiny else ''}: {n:,} parameters "
            f"trainable; guidance {cfg.spm.guidance}; labels {cfg.spm.relabel}",
            f"  data        {self._describe_data()}",
            f"  batch       {cfg.train.batch_size} per process x {acc.num_processes} processes x {cfg.train.grad_accum} "
            f"accumulation = {eff} pairs per step",
            f"  schedule    {cfg.train.max_steps} steps; lr {self.lr:g} ({cfg.optim.optimizer}, {cfg.optim.scheduler}, "
            f"warmup {cfg.optim.warmup_steps})",
            f"  precision   {cfg.train.mixed_precision}; device {acc.device}; output {self.out}",
        ])  # fmt: skip

    def validate(self):
        return None

    def export(self, metrics: dict) -> Path | None:
        """OUT/final/spm.safetensors in the released checkpoints' key space (`diffalign.rewards.spm`; load with
        create_scorer("spm", checkpoint="OUT/final")) and spm.json (what it was trained from and on)."""
        from safetensors.torch import save_file

        from diffalign.atomic import write_atomic
        from diffalign.config import dump_config
        from diffalign.rewards.spm import SPM_EXPORT

        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        final = self.out / "final"
        final.mkdir(parents=True, exist_ok=True)
        spm = self.acc.unwrap_model(self.unet)
        state = {k: v.detach().cpu().contiguous() for k, v in spm.reference_state_dict().items()}
        save_file(state, str(final / SPM_EXPORT))
        info = {"clip": self.cfg.spm.clip, "processor": self.cfg.spm.processor, "tiny": self.cfg.spm.tiny,
                "diffusion_model": self.cfg.model.pretrained, "steps": self.step, "final_metrics": metrics}  # fmt: skip
        write_atomic(final / "spm.json", json.dumps(info, indent=2, default=str) + "\n")
        (final / "config.yaml").write_text(dump_config(self.cfg))
        return final


@cli_entry("diffalign train-spm")
def main(argv: list[str] | None = None) -> int:
    from diffalign.config import load_spm_config
    from diffalign.training.cli import run_command

    return run_command(argv, "diffalign train-spm", "Train SPO's step-aware preference model on preference pairs.",
                       "configs/spm_sd15.yaml", load_spm_config, "diffalign.training.spm:SPMTrainer")  # fmt: skip
