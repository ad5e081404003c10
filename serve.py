#!/usr/bin/env python
"""The OpenAI-compatible server as a script, for launchers that take a script path (msrun):

  msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True serve.py --model DIR \\
        --tensor_parallel_size 2 --port 8000

Same arguments as `python -m glm4v_ms.serve` (rank 0 serves HTTP; the other ranks follow its engine)."""
import sys

from glm4v_ms.serve.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
