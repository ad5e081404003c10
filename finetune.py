#!/usr/bin/env python
"""Fine-tuning as a script, for launchers that take a script path (msrun): data parallel over the launch's ranks,

  msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True finetune.py \\
        examples/finetune/demo_tiny_lora.yaml [--deepspeed examples/deepspeed/ds_z2_config.json] [--key value ...]

Same arguments as `python -m glm4v_ms.finetune` (rank 0 logs and writes; the other ranks are silent)."""
import sys

from glm4v_ms.finetune.distributed import silence_other_ranks
from glm4v_ms.finetune.__main__ import main

if __name__ == "__main__":
    silence_other_ranks()
    sys.exit(main())
