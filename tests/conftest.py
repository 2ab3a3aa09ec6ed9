import os

import pytest
import torch

# Triton kernels run on the CPU through its interpreter, which must be chosen before triton is
# first imported (any test module may import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: on a busy 2-core machine a second intra-op thread only adds
    wake-up latency to every op (measured: export of EDSR-baseline 0.24 s with one thread, 17 s
    with two while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
