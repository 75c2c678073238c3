"""What a run can check before it loads a model (seconds, not the minutes a model load takes), and the
run-time checks of the same facts. Each failure is a UserError: one line naming the file or id and the fix
(diffalign/errors.py)."""

from __future__ import annotations

from diffalign.data.sources import DataFormatError
from diffalign.errors import require

#: items decoded before any model loads; a run then checks its skip share once it has read as many
PROBE_ITEMS = 32


def _dataset(ds):
    """The PreferenceDataset under a dataset (the latent cache wraps one)."""
    return getattr(ds, "data", ds)


def check_skip_share(ds, skipped: int, read: int, limit: float, where: str, none_usable_is_error: bool = True) -> None:
    """Raise DataFormatError when `skipped` of `read` items exceed the share `limit`, or (by default) when
    none of them is usable whatever the limit."""
    if read == 0 or (skipped <= limit * read and not (none_usable_is_error and skipped == read)):
        return
    pds = _dataset(ds)
    stats = pds.stats
    examples = getattr(pds, "skip_examples", {})
    reasons = ", ".join(f"{r} {stats.get(r, 0)}" for r in sorted(examples)) or "see the warnings above"
    example = next(iter(examples.values()), "")
    hint = " (image URLs are not downloaded: give local paths)" if "://" in example else ""
    raise DataFormatError(
        f"{pds.src.description}: {skipped} of {read} items {where} were skipped ({reasons}), more than "
        f"data.max_skip_fraction={limit}; first: {example}{hint}. Fix the data (paths are read relative to "
        f"{pds.src.base_dir}), or raise data.max_skip_fraction"
    )


def probe_data(ds, limit: float) -> None:
    """Decode the first PROBE_ITEMS items (all of a smaller dataset) and check their skip share."""
    n = min(len(ds), PROBE_ITEMS)
    skipped = sum(ds[i] is None for i in range(n))
    check_skip_share(ds, skipped, n, limit, "read before training" if n < len(ds) else "of the data")


def check_extras(cfg) -> None:
    """The optional packages the config switches on are installed (MissingExtra names the extra)."""
    if cfg.logging.wandb:
        require("wandb", "wandb", "logging.wandb=true")
    if cfg.train.attention == "xformers":
        require("xformers", "xformers", "train.attention=xformers")
    if cfg.optim.optimizer == "adamw8bit":
        require("bitsandbytes", "bnb", "optim.optimizer=adamw8bit")


def check_model(mc) -> None:
    """model.pretrained is a readable pipeline (its model_index.json: a local file, or the hub / its
    cache), and a local model.vae exists; the weights are not read."""
    from pathlib import Path

    from diffalign.backbones.registry import BUILDER_KINDS, read_model_index
    from diffalign.errors import MissingFile

    if mc.pretrained.partition(":")[0] not in BUILDER_KINDS:  # tiny:, random:, small: are built in code
        read_model_index(mc.pretrained, mc.revision)
    if mc.vae and mc.vae.startswith(("/", ".", "~")) and not Path(mc.vae).expanduser().exists():
        raise MissingFile(f"model.vae {mc.vae!r}: no such folder; give a VAE folder or hub id, or remove model.vae")
