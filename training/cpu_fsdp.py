"""`unimedvl-train` under accelerate's FSDP2 on CPU processes (gloo), to prove sharded training without GPUs.

    torchrun --nproc_per_node 2 -m unimedvl_training.cpu_fsdp --stage 1 --config data.yaml --model M --output O \
        --use-cpu --fsdp "full_shard auto_wrap" --fsdp_config training/accelerate_configs/fsdp2_trainer.json

On GPUs, `accelerate launch --config_file training/accelerate_configs/fsdp2.yaml -m unimedvl_training.train ...`
makes accelerate shard the model with FSDP2 (`fully_shard` on every `UniMedVLDecoderLayer` and `SiglipEncoderLayer`,
then the embeddings, the final norm + `lm_head`, and the root; `cpu_ram_efficient_loading`: only rank 0 loads
weights, the others build the model on the meta device and receive their shards by broadcast). accelerate enables that
path only for accelerator devices; with CPU processes it falls back to DDP. This launcher lifts exactly that gate: the
accelerator state built for the gloo CPU world is switched to `DistributedType.FSDP` with the Trainer's FSDP plugin,
and everything else (the Trainer, accelerate's `fsdp2_prepare_model`, sharded DCP checkpoints, the full state dict
of `final/`) is the code that runs on GPUs. The run ends with accelerate's clean shutdown (environment.md).
"""

import functools
import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu() -> None:
    """Lets `Accelerator(cpu=True, fsdp_plugin=...)` in a multi-process gloo world use FSDP instead of DDP."""
    original = AcceleratorState.__init__
    if getattr(original, "_unimedvl_cpu_fsdp", False):
        return

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init._unimedvl_cpu_fsdp = True
    AcceleratorState.__init__ = init


def main(argv=None) -> int:
    import torch.distributed as dist

    os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
    os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    dist.init_process_group("gloo")  # before any model loading: transformers' meta-device loading on ranks > 0
    allow_fsdp_on_cpu()
    from .train import main as train_main

    status = train_main(argv)
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
