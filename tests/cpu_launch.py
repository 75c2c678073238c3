"""`python -m tests.cpu_launch train CONFIG`: `diffalign train` for the multi-process tests on CPU.

- FSDP: accelerate chooses FSDP only on GPU-type devices, so `accelerate launch --config_file
  configs/accelerate/fsdp.yaml` on CPUs gives a gloo DDP group (which diffalign refuses, since it is not
  what was asked for). torch's FSDP2 itself runs on CPU over gloo. Here accelerate's state becomes FSDP,
  with the plugin accelerate built from the launcher's environment, right after accelerate set itself
  up; everything after that (accelerate's FSDP2 wrap, its state dicts, save_state / load_state, clipping)
  is accelerate's and diffalign's own code, as on GPUs.
- DIFFALIGN_TEST_CRASH_AT_STEP=n: the process dies when n optimizer steps are done (as a kill would), so a
  test can resume from the last checkpoint.
- DIFFALIGN_TEST_SLOW_RANK=r:where: rank r is slow (0.5 s) at each checkpoint, where = `enter` (on entering
  save_checkpoint, before anything is written) or `write` (before writing its files with save_state): the
  orders a fast machine rarely shows, which the barriers must make harmless.

Tests only; nothing in diffalign imports it.
"""

from __future__ import annotations

import os
import sys


def _fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # every later AcceleratorState() copies PartialState's fields back in: change both
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init


def _crash_at(step: int) -> None:
    from diffalign.training.trainer import Trainer

    original = Trainer._optimizer_step

    def crashing(self, batches):
        if self.step == step:
            raise SystemExit(f"simulated crash after step {step}")
        return original(self, batches)

    Trainer._optimizer_step = crashing


def _slow_rank(rank: int, where: str) -> None:
    import time

    from accelerate import Accelerator

    from diffalign.training.trainer import Trainer

    owner, name = (Trainer, "save_checkpoint") if where == "enter" else (Accelerator, "save_state")
    original = getattr(owner, name)

    def slow(self, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank:
            time.sleep(0.5)
        return original(self, *args, **kwargs)

    setattr(owner, name, slow)


if __name__ == "__main__":
    _fsdp_on_cpu()
    if os.environ.get("DIFFALIGN_TEST_CRASH_AT_STEP"):
        _crash_at(int(os.environ["DIFFALIGN_TEST_CRASH_AT_STEP"]))
    if os.environ.get("DIFFALIGN_TEST_SLOW_RANK"):
        rank, where = os.environ["DIFFALIGN_TEST_SLOW_RANK"].split(":")
        _slow_rank(int(rank), where)
    from diffalign.cli import main

    sys.exit(main(sys.argv[1:]))
