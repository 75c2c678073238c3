"""The T5 text encoder of the flow-matching families (SD3 / SD3.5: T5-XXL, optional; FLUX.1: T5-XXL),
held lazily: T5-XXL has 4.7 B parameters (about 9.5 GB in bf16) and training from the latent/text cache
never needs it, so it is built (read from its folder) on its first use, at the placement `place` recorded.

The cache's fingerprint must cover T5 without loading it, so a T5 read from files is identified by a
digest of those files (sizes, headers and the first and last MiB of each safetensors file of the
folder), read from the local folder or, for a hub id, from the local hub cache or by byte ranges over
HTTP: the same weights give the same digest whether or not they are loaded. A T5 built in code is
identified by `module_digest` like every other module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

_SAMPLE = 1 << 20  # bytes digested at each end of a safetensors file


class LazyModule:
    """A frozen module built by `build(dtype)` on first `get()`, then moved to the recorded placement.

    `LazyModule.of(module)` wraps one already built (tiny models, tests)."""

    def __init__(self, build: Callable[[torch.dtype | None], nn.Module], digest: Callable[[], str]):
        self._build, self._digest = build, digest
        self.module: nn.Module | None = None
        self.device, self.dtype = None, None

    @classmethod
    def of(cls, module: nn.Module) -> LazyModule:
        from diffalign.backbones.sd import module_digest

        lazy = cls(lambda dtype: module, lambda: module_digest(module))
        lazy.module = module.requires_grad_(False)
        return lazy

    @property
    def loaded(self) -> bool:
        return self.module is not None

    def get(self) -> nn.Module:
        if self.module is None:
            module = self._build(self.dtype).requires_grad_(False).eval()
            self.module = module
            if self.device is not None:
                self.place(self.device, self.dtype)
        return self.module

    def place(self, device, dtype: torch.dtype) -> None:
        """Record (and, once built, apply) where the module runs. A module read from files is read in that
        dtype and keeps the layers transformers holds in fp32 for numerical safety (T5's `wo` under fp16),
        so it is cast only when its first parameter is in another dtype (Backbone.place's rule)."""
        self.device, self.dtype = device, dtype
        if self.module is not None:
            self.module.to(device)
            if next(self.module.parameters()).dtype != dtype:
                self.module.to(dtype)

    def digest(self) -> str:
        return self._digest()


def _is_variant(name: str, variant: str | None) -> bool:
    """`model.safetensors`, `model-00001-of-00002.safetensors` are the plain files; `model.fp16.safetensors`,
    `model.fp16-00001-of-00002.safetensors` the fp16 variant's (diffusers' variant naming)."""
    stem = name[: -len(".safetensors")]
    if variant is None:
        return "." not in stem
    return stem.partition(".")[2].split("-")[0] == variant


def _digest_files(files: list[tuple[str, int, Callable[[int, int], bytes]]]) -> str:
    """files: (name, size, read(offset, length)) of each safetensors file, digested in name order."""
    if not files:
        raise FileNotFoundError("no safetensors files to digest")
    h = hashlib.sha256(b"safetensors-files")
    for name, size, read in sorted(files):
        h.update(f"{name}:{size}".encode())
        h.update(read(0, min(size, _SAMPLE)))
        if size > _SAMPLE:
            h.update(read(max(_SAMPLE, size - _SAMPLE), size - max(_SAMPLE, size - _SAMPLE)))
    return h.hexdigest()[:16]


def _local_reader(path: Path) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read


def files_digest(pretrained: str, subfolder: str, revision: str | None = None, variant: str | None = None) -> str:
    """The digest of a model's safetensors files in `subfolder` of a local folder or a hub repository,
    without loading them."""
    folder = Path(pretrained) / subfolder
    if not folder.is_dir():  # a hub id: the local hub cache if it has the files, else byte ranges over HTTP
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{subfolder}/*"],
                                            local_files_only=True)) / subfolder  # fmt: skip
        except Exception:  # not cached here
            folder = None
    if folder is not None and folder.is_dir():
        paths = [p for p in folder.glob("*.safetensors") if _is_variant(p.name, variant)]
        if paths:
            return _digest_files([(p.name, p.stat().st_size, _local_reader(p)) for p in paths])
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    root = f"{pretrained}@{revision}" if revision else pretrained
    entries = [e for e in fs.ls(f"{root}/{subfolder}", detail=True)
               if e["name"].endswith(".safetensors") and _is_variant(e["name"].rsplit("/", 1)[-1], variant)]  # fmt: skip

    def remote(name: str) -> Callable[[int, int], bytes]:
        def read(offset: int, length: int) -> bytes:
            with fs.open(name, "rb") as f:
                f.seek(offset)
                return f.read(length)

        return read

    return _digest_files([(e["name"].rsplit("/", 1)[-1], int(e["size"]), remote(e["name"])) for e in entries])


def lazy_t5_from(pretrained: str, subfolder: str, revision: str | None = None, variant: str | None = None) -> LazyModule:
    """T5EncoderModel read from `subfolder` of a folder or hub id on first use, in the dtype placed by then."""
    from transformers import T5EncoderModel

    def build(dtype):
        kw = {} if dtype is None else {"dtype": dtype}
        return T5EncoderModel.from_pretrained(pretrained, subfolder=subfolder, revision=revision, variant=variant,
                                              **kw)  # fmt: skip

    return LazyModule(build, lambda: files_digest(pretrained, subfolder, revision, variant))


@torch.no_grad()
def t5_states(tokenizer, encoder: nn.Module, prompts: list[str], max_length: int) -> torch.Tensor:
    """T5's last hidden states [N, max_length, d] for prompts padded / truncated to max_length tokens, as
    StableDiffusion3Pipeline / FluxPipeline's `_get_t5_prompt_embeds` computes them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
    return encoder(ids.to(encoder.device))[0]
