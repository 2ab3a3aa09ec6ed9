import os

import torch

# Triton kernels run on the CPU through its interpreter, which must be chosen before triton is
# first imported (any test module may import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
