#!/usr/bin/env python
"""The CLI as a script (glm4v_ms/generate_cli.py; installed as glm4v-ms-generate), for a checkout and for launchers
that take a script path (msrun):

  python generate.py --model_name DIR --image cat.jpg --prompt "Describe this image."
  msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --join=True \\
        generate.py --model_name GLM-4.5V --tensor_parallel_size 4 --image cat.jpg --prompt "Hi"
"""
import sys

from glm4v_ms.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
