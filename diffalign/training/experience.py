"""Experience sources: what one micro-batch gives the objective, whichever way its candidates came.

The trainer asks a source for the next micro-batch's `Experience` (preference weights phi, and a function
from a model to per-candidate energies) and runs the same step for every method:

    exp = source.next(batch, micro, policy, reference)
    energy = exp.energy(policy)
    with no_grad, reference.model(policy) as ref:  ref_energy = exp.energy(ref) if ref else None
    loss, metrics = objective(energy, ref_energy, exp.phi, **params)

- `OfflineSource`: every candidate comes from the data (pixels or the latent cache): DPO, MaPO, DCPO,
  RankDPO, SFT on preference data.
- `GeneratedSource`: the preferred candidate from the data, the other sampled during training by a module
  the source is given (the reference's, or the policy): SPIN-Diffusion, SePPO.
- `RolloutSource`: prompts only; the policy rolls them out through SPO's step-wise resampler and the kept
  (win, lose) denoising transitions are the candidates: SPO.

Determinism: every draw (timestep, noise, VAE posterior sample, generation seeds) is a function of
(train.seed, the item's position in the data stream), so accumulation, N processes and resume replay the
same run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from diffalign.backbones.base import Backbone, Conditioning
from diffalign.backbones.processes import NoiseProcess
from diffalign.kernels.energy import per_sample_mse, per_sample_mse_reference

Energy = Callable[[torch.nn.Module], torch.Tensor]


@dataclass
class Experience:
    phi: torch.Tensor  # [B, K] preference strength of each candidate, best first
    energy: Energy  # model -> [B, K] float32 energies (lower = the model likes the candidate more)
    metrics: dict[str, float] = field(default_factory=dict)
    #: the loss's weight on this process (1 unless a source splits a mini-batch unevenly across processes)
    weight: float = 1.0
    #: offline experience: each item's data-stream position and key (a precomputed reference reads its
    #: energies by position and checks the key)
    positions: list[int] | None = None
    keys: list[str] | None = None


def stream_seed(seed: int, stream: str, position: int) -> int:
    """A 63-bit seed for one named random stream at one data-stream position."""
    words = [int(seed) & 0xFFFFFFFF, int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little") & 0xFFFFFFFF,
             int(position) & 0xFFFFFFFF, int(position) >> 32]  # fmt: skip
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def item_noise(process: NoiseProcess, seed: int, positions: list[int], k: int, shape, per_candidate: bool = False):
    """Timestep, diffusion noise and VAE-posterior noise of each item, a function of (seed, the item's
    position in the data stream) only.

    Keying on the stream position (micro-step x global batch + offset) rather than on the micro-step makes
    batch 4 equal accumulation 4 x batch 1, and 2 processes x batch 1 equal 1 process x batch 2.
    Returns t [B], noise [B, *shape] shared by the item's k candidates (or [B, k, *shape] with
    `per_candidate`: candidate 0 keeps the shared draw, the others are drawn after the posterior noise)
    and eps [B, k, *shape]."""
    ts, noises, eps = [], [], []
    for pos in positions:
        g = torch.Generator().manual_seed((seed + 1) * 1_000_003 + pos)
        ts.append(process.sample_t(1, g))
        shared = torch.randn((1, *shape), generator=g)
        eps.append(torch.randn((1, k, *shape), generator=g))
        if per_candidate:
            others = torch.randn((1, k - 1, *shape), generator=g)
            noises.append(torch.cat([shared.unsqueeze(1), others], dim=1))
        else:
            noises.append(shared)
    return torch.cat(ts), torch.cat(noises), torch.cat(eps)


def candidate_noise(params) -> bool:
    """True when an objective's validated params ask for one diffusion noise per candidate (RankDPO's
    `noise: per_image`); otherwise an item's candidates share one."""
    return getattr(params, "noise", "shared") == "per_image"


def mse_energy(backbone: Backbone, model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               cond: Conditioning, fused: bool = False) -> torch.Tensor:  # fmt: skip
    """Per-candidate denoising error: mean over the latent dimensions of (prediction - target)^2, in fp32
    (the process's target and loss output: epsilon / v / x0 for DDPM, the velocity for flow matching).

    x0 [B, K, ...]; noise [B, ...] shared by an item's K candidates, or [B, K, ...] one per candidate;
    t [B] shared; cond holds B*K rows in item-major order. Returns [B, K] in float32. `fused`: through
    the fused kernel (diffalign/kernels/energy.py), which reads a bf16/fp16 prediction without an fp32
    copy; else its plain-torch reference."""
    B, K = x0.shape[:2]
    x0_flat = x0.flatten(0, 1)
    if noise.dim() == x0.dim():
        noise_flat = noise.flatten(0, 1)
    else:
        noise_flat = noise.unsqueeze(1).expand(B, K, *noise.shape[1:]).flatten(0, 1)
    t_flat = t.to(x0.device).repeat_interleave(K)
    process = backbone.process
    noisy = process.add_noise(x0_flat, noise_flat, t_flat)
    target = process.target(x0_flat, noise_flat, t_flat)
    pred = process.loss_output(backbone.predict(model, noisy, t_flat, cond), noisy, t_flat)
    err = (per_sample_mse if fused else per_sample_mse_reference)(pred, target)
    return err.view(B, K)


class OfflineSource:
    """Candidates from the data: a batch of pixels (or cached VAE posteriors and text conditioning)."""

    kind = "offline"

    def __init__(self, backbone: Backbone, seed: int, resolution: int, device, dtype: torch.dtype,
                 global_batch: int, local_batch: int, rank: int, candidates: int | None = None,
                 per_candidate_noise: bool = False, fused_energy: bool = False):  # fmt: skip
        self.backbone, self.seed, self.resolution = backbone, seed, resolution
        self.fused_energy = fused_energy
        self.device, self.dtype = device, dtype
        self.global_batch, self.local_batch, self.rank = global_batch, local_batch, rank
        self.candidates = candidates
        self.per_candidate_noise = per_candidate_noise

    def positions(self, micro: int, n: int) -> list[int]:
        """Data-stream positions of this process's n items of micro-batch `micro`."""
        first = micro * self.global_batch + self.rank * self.local_batch
        return list(range(first, first + n))

    def conditioning(self, batch: dict, K: int) -> Conditioning:
        """Text (and micro-)conditioning for the B*K candidates, item-major."""
        bb = self.backbone
        if "cond" in batch:  # from the cache
            cond = {k: v[:, :K].flatten(0, 1).to(self.device, self.dtype) for k, v in batch["cond"].items()}
        else:
            captions = [c for item in batch["captions"] for c in item[:K]]
            unique = list(dict.fromkeys(captions))
            enc = bb.encode_text(unique)
            where = torch.tensor([unique.index(c) for c in captions], device=self.device)
            cond = {k: v[where] for k, v in enc.items()}
        micro = bb.micro_conditioning(batch["original_size"][:, :K].flatten(0, 1).cpu(),
                                      batch["crop_top_left"][:, :K].flatten(0, 1).cpu(), self.resolution)  # fmt: skip
        return cond | {k: v.to(self.device) for k, v in micro.items()}

    def latents(self, batch: dict, K: int, eps: torch.Tensor) -> torch.Tensor:
        """x0 [B, K, ...] float32: each candidate's VAE posterior sample drawn with its eps."""
        bb = self.backbone
        if "latent_mean" in batch:  # from the cache
            mean, std = batch["latent_mean"][:, :K].flatten(0, 1), batch["latent_std"][:, :K].flatten(0, 1)
        else:
            mean, std = bb.latent_posterior(batch["pixel_values"][:, :K].flatten(0, 1))
        x0 = bb.latents_from_posterior(mean.float(), std.float(), eps.flatten(0, 1).to(self.device)).float()
        return x0.view(batch["phi"].shape[0], K, *x0.shape[1:])

    def inputs(self, batch: dict, micro: int) -> dict:
        """What a micro-batch's energies are computed from: x0 [B, K, ...], noise, t [B], cond (B*K rows),
        phi [B, K], and the items' stream positions."""
        K = self.candidates or batch["phi"].shape[1]
        B = batch["phi"].shape[0]
        positions = self.positions(micro, B)
        t, noise, eps = item_noise(self.backbone.process, self.seed, positions, K, self._latent_shape(batch),
                                   self.per_candidate_noise)  # fmt: skip
        return {"x0": self.latents(batch, K, eps), "noise": noise.to(self.device), "t": t.to(self.device),
                "cond": self.conditioning(batch, K), "phi": batch["phi"][:, :K].to(self.device, torch.float32),
                "positions": positions}  # fmt: skip

    def energy_of(self, inputs: dict, model) -> torch.Tensor:
        return mse_energy(self.backbone, model, inputs["x0"], inputs["noise"], inputs["t"], inputs["cond"],
                          self.fused_energy)  # fmt: skip

    def next(self, batch: dict, micro: int, policy=None, reference=None) -> Experience:
        i = self.inputs(batch, micro)
        return Experience(phi=i["phi"], energy=lambda model: self.energy_of(i, model), positions=i["positions"],
                          keys=batch.get("keys"))  # fmt: skip

    def placeholder(self) -> Experience:
        """One item of zero latents under the empty prompt at t of the first draw: for a rank whose micro-batch
        holds no usable item, so that it still runs the forward passes (and collectives) the others run.
        Its loss is multiplied by zero; nothing here depends on the data."""
        bb, K, res = self.backbone, self.candidates or 2, self.resolution
        shape = bb.latent_shape(res, res)
        x0 = torch.zeros(1, K, *shape, device=self.device)
        noise = torch.zeros(1, *shape, device=self.device)
        t = bb.process.sample_t(1, torch.Generator().manual_seed(0)).to(self.device)
        cond = {k: v.to(self.device) for k, v in bb.empty_conditioning(K).items()}
        cond |= {k: v.to(self.device) for k, v in bb.sampling_conditioning(K, res, res).items()}
        phi = torch.zeros(1, K, device=self.device)
        phi[:, 0] = 1.0
        return Experience(phi=phi, energy=lambda model: mse_energy(bb, model, x0, noise, t, cond, self.fused_energy))

    def _latent_shape(self, batch: dict) -> tuple[int, ...]:
        if "latent_mean" in batch:
            return tuple(batch["latent_mean"].shape[2:])
        return self.backbone.latent_shape(*batch["pixel_values"].shape[-2:])


class GeneratedSource(OfflineSource):
    """The data's preferred candidate against one sampled now, from the same prompt, by the module
    `generator(policy, reference)` yields (default: the reference's); the sample is noised with the
    winner's noise and timestep. Its seeds are a function of (seed, stream position)."""

    kind = "generated"

    def __init__(self, *args, steps: int = 20, guidance: float = 5.0, eta: float = 0.0, generator: str = "reference",
                 sample_batch: int = 1, **kwargs):  # fmt: skip
        super().__init__(*args, candidates=1, **kwargs)
        self.steps, self.guidance, self.eta, self.generator = steps, guidance, eta, generator
        self.sample_batch = sample_batch

    def generation_seeds(self, positions: list[int]) -> list[int]:
        return [stream_seed(self.seed, "generate", p) for p in positions]

    @torch.no_grad()
    def generate(self, module, prompts: list[str], positions: list[int]) -> torch.Tensor:
        from diffalign.sampling import sample

        out = sample(self.backbone, module, prompts, self.generation_seeds(positions), steps=self.steps,
                     guidance=self.guidance, eta=self.eta, height=self.resolution, width=self.resolution,
                     batch_size=self.sample_batch)  # fmt: skip
        return out.latents.float()

    def next(self, batch: dict, micro: int, policy=None, reference=None) -> Experience:
        B = batch["phi"].shape[0]
        positions = self.positions(micro, B)
        shape = self._latent_shape(batch)
        t, noise, eps = item_noise(self.backbone.process, self.seed, positions, 1, shape)
        winner = self.latents(batch, 1, eps)  # [B, 1, ...]
        prompts = [item[0] for item in batch["captions"]]
        if self.generator == "policy":
            generated = self.generate(policy, prompts, positions)
        else:
            with reference.model(policy) as module:
                if module is None:
                    raise ValueError("experience.generator=reference needs a reference model")
                generated = self.generate(module, prompts, positions)
        x0 = torch.cat([winner, generated.to(winner.device).unsqueeze(1)], dim=1)
        t, noise = t.to(self.device), noise.to(self.device)
        # both candidates share the prompt; the winner keeps the data's micro-conditioning, the sample gets
        # the sampler's default (SDXL: its own size, no crop)
        win = self.conditioning(batch, 1)
        gen = {k: v.to(self.device) for k, v in self.backbone.sampling_conditioning(B, self.resolution,
                                                                                   self.resolution).items()}  # fmt: skip
        cond = {k: torch.stack([v, gen.get(k, v).to(v.dtype)], dim=1).flatten(0, 1) for k, v in win.items()}
        phi = torch.tensor([[1.0, 0.0]], device=self.device).expand(B, 2)
        return Experience(phi=phi, energy=lambda model: mse_energy(self.backbone, model, x0, noise, t, cond,
                                                                   self.fused_energy))


class RolloutSource:
    """SPO's online experience: each batch of prompts is rolled out now by the policy through the step-wise
    resampler (diffalign/sampling/resample.py), and the kept (win, lose) transitions are trained on in
    mini-batches of `pairs_per_step` pairs per process, several optimizer steps per rollout, as the reference's
    training loop does (RockeyCoss/SPO train_spo.py: gather every process's pairs, shuffle them with one
    permutation, split them across processes, train in `train_batch_size` chunks).

    The energy of a pair is -log p(x_{t-1} | x_t) of the winner's and the loser's transition (the stochastic
    DDIM / flow-SDE Gaussian with classifier-free guidance, as sampled), under the model given.

    Determinism: prompt i's rollout draws come from stream_seed(seed, "rollout", its stream position), the
    shuffle of a rollout's pairs from stream_seed(seed, "pairs", the rollout's micro-batch index). The kept
    pairs of every process are gathered in process order and mini-batch j gives process r the shuffled pairs
    j * G + r, j * G + r + N, ... (G = pairs_per_step x N processes), so N processes see the same pairs as one
    process with N times the prompts and pairs per step. A process whose share of a rollout's last, partial
    mini-batch is empty computes a stand-in pair with loss weight 0, so that every process runs the same
    forward and backward passes; each share's loss is weighted by N x its pairs / the mini-batch's pairs, so
    the processes' mean gradient is the mean over the mini-batch's pairs. A rollout that keeps no pair on
    any process yields nothing (`next` returns None), and the trainer reads the next batch of prompts; the
    pairs not yet trained on are part of every checkpoint (`save_state`)."""

    kind = "rollout"
    STATE_FILE = "rollout.safetensors"

    def __init__(self, backbone: Backbone, seed: int, resolution: int, device, dtype: torch.dtype, global_batch: int,
                 local_batch: int, rank: int, world: int, scorer, steps: int = 20, guidance: float = 5.0,
                 eta: float = 1.0, sample_batch: int = 1, candidates: int = 4, divert_start_step: int = 4,
                 inner_steps: int = 0, threshold: float = 0.3, pairs_per_step: int = 10, unwrap=lambda m: m,
                 autocast=None):  # fmt: skip
        import contextlib

        self.backbone, self.seed, self.resolution = backbone, seed, resolution
        self.device, self.dtype = device, dtype
        self.global_batch, self.local_batch, self.rank, self.world = global_batch, local_batch, rank, world
        self.scorer = scorer  # fn(images in [-1, 1], prompts, t) -> scores (diffalign.rewards.spm.as_step_scorer)
        self.steps, self.guidance, self.eta, self.sample_batch = steps, guidance, eta, sample_batch
        self.candidates, self.divert_start_step, self.inner_steps = candidates, divert_start_step, inner_steps
        self.threshold, self.pairs_per_step = threshold, pairs_per_step
        self.unwrap = unwrap
        self.autocast = autocast or contextlib.nullcontext
        from diffalign.sampling.loop import sampling_schedule

        self.schedule = sampling_schedule(backbone, steps, resolution, resolution)  # the resampler's
        self.buffer: dict | None = None

    # ---- rollouts ---------------------------------------------------------------------------------------
    def pending(self) -> bool:
        """True while pairs of an earlier rollout are left to train on (the trainer then reads no data)."""
        return self.buffer is not None

    def rollout_seeds(self, positions: list[int]) -> list[int]:
        return [stream_seed(self.seed, "rollout", p) for p in positions]

    def rollout(self, prompts: list[str], micro: int, policy) -> None:
        """Roll out this process's prompts of micro-batch `micro`, gather every process's kept pairs and
        shuffle them into the buffer (left None when no process kept a pair)."""
        from diffalign.sampling.resample import resample

        first = micro * self.global_batch + self.rank * self.local_batch
        seeds = self.rollout_seeds(list(range(first, first + len(prompts))))
        with torch.no_grad(), self.autocast():
            pairs = resample(self.backbone, self.unwrap(policy), prompts, seeds, self.scorer, steps=self.steps,
                             guidance=self.guidance, eta=self.eta, divert_start=self.divert_start_step,
                             candidates=self.candidates, inner_steps=self.inner_steps, threshold=self.threshold,
                             height=self.resolution, width=self.resolution, batch_size=self.sample_batch)  # fmt: skip
        meta = _all_gather_objects({"n": len(pairs), "prompts": list(prompts), "scores": pairs.scores.tolist(),
                                    "compared": pairs.compared, "kept": pairs.kept}, self.world)  # fmt: skip
        counts = [m["n"] for m in meta]
        n = sum(counts)
        scores = torch.tensor([s for m in meta for s in m["scores"]])
        compared = sum(m["compared"] for m in meta)
        self.last_metrics = {
            "kept_fraction": sum(m["kept"] for m in meta) / max(compared, 1),
            "rollout_pairs": float(n),
            "preference_score_mean": float(scores.mean()) if len(scores) else 0.0,
            "preference_score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        }
        if n == 0:
            self.buffer = None
            return
        offsets = [sum(len(m["prompts"]) for m in meta[:r]) for r in range(self.world)]
        prompt_index = _gather_rows(pairs.prompt + offsets[self.rank], counts, self.world, self.device)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.seed, "pairs", micro)))
        self.buffer = {
            "x": _gather_rows(pairs.x.to(self.device), counts, self.world, self.device),
            "prev": _gather_rows(pairs.prev.to(self.device), counts, self.world, self.device),
            "step": _gather_rows(pairs.step, counts, self.world, self.device).cpu(),
            "prompt": prompt_index.cpu(),
            "order": perm,
            "prompts": [p for m in meta for p in m["prompts"]],
            "next": 0,
            "metrics": dict(self.last_metrics),
        }

    # ---- mini-batches -----------------------------------------------------------------------------------
    def next(self, batch: dict, micro: int | None, policy=None, reference=None) -> Experience | None:
        """A new batch of prompts (micro given) is rolled out first; then the next mini-batch of pairs."""
        if micro is not None:
            self.rollout(list(batch["prompts"]), micro, policy)
            if self.buffer is None:
                return None
        buf = self.buffer
        G = self.pairs_per_step * self.world
        j = buf["next"]
        chunk = buf["order"][j * G : (j + 1) * G]
        mine = chunk[self.rank :: self.world]
        weight = self.world * len(mine) / len(chunk)
        if len(mine) == 0:  # a stand-in pair with no weight, so that every process runs forward and backward
            mine = chunk[:1]
        buf["next"] = j + 1
        if buf["next"] * G >= len(buf["order"]):
            self.buffer = None
        return self._experience(buf, mine, weight)

    def _experience(self, buf: dict, idx: torch.Tensor, weight: float) -> Experience:
        from diffalign.sampling.loop import sampling_conditions, transition_log_prob

        bb, n = self.backbone, len(idx)
        x = buf["x"][idx.to(buf["x"].device)].flatten(0, 1)  # [2n, ...]: winner, loser of each pair
        prev = buf["prev"][idx.to(buf["prev"].device)].flatten(0, 1)
        steps = buf["step"][idx].repeat_interleave(2)
        t = torch.stack([torch.as_tensor(self.schedule[s][0]) for s in steps.tolist()])
        t_prev = torch.stack([torch.as_tensor(self.schedule[s][1]) for s in steps.tolist()])
        prompts = [buf["prompts"][int(p)] for p in buf["prompt"][idx].repeat_interleave(2)]
        unique = list(dict.fromkeys(prompts))
        cond, uncond = sampling_conditions(bb, unique, self.resolution, self.resolution, self.guidance, self.device,
                                           self.dtype)  # fmt: skip
        rows = torch.tensor([unique.index(p) for p in prompts])
        cond = {k: v[rows.to(v.device)] for k, v in cond.items()}
        uncond = {k: v[rows.to(v.device)] for k, v in uncond.items()} if uncond is not None else None

        def energy(model) -> torch.Tensor:
            lp = transition_log_prob(bb, model, x, prev, t, t_prev, cond, uncond, self.guidance, self.eta)
            return -lp.view(n, 2)

        phi = torch.tensor([[1.0, 0.0]], device=self.device).expand(n, 2)
        metrics = {"pairs": float(n if weight else 0), **buf["metrics"]}
        return Experience(phi=phi, energy=energy, metrics=metrics, weight=weight)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_state(self, folder) -> None:
        """The pairs not yet trained on (the same on every process; the main process writes them)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(folder) / self.STATE_FILE
        if self.buffer is None:
            return
        buf = self.buffer
        tensors = {k: buf[k].detach().cpu().contiguous() for k in ("x", "prev", "step", "prompt", "order")}
        meta = {"next": str(buf["next"]), "prompts": json.dumps(buf["prompts"]), "metrics": json.dumps(buf["metrics"])}
        save_file(tensors, str(path), metadata=meta)

    def load_state(self, folder) -> None:
        import json
        from pathlib import Path

        from safetensors import safe_open

        path = Path(folder) / self.STATE_FILE
        if not path.is_file():
            self.buffer = None
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            buf = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        buf["x"], buf["prev"] = buf["x"].to(self.device), buf["prev"].to(self.device)
        buf |= {"next": int(meta["next"]), "prompts": json.loads(meta["prompts"]), "metrics": json.loads(meta["metrics"])}
        self.buffer = buf


def _all_gather_objects(obj, world: int) -> list:
    """[obj of process 0, ..., obj of process N-1] (small metadata: counts, prompts, scores)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _gather_rows(t: torch.Tensor, counts: list[int], world: int, device) -> torch.Tensor:
    """Every process's rows of t (counts[r] rows on process r), concatenated in process order."""
    if world == 1:
        return t
    import torch.distributed as dist

    t = t.to(device)
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
