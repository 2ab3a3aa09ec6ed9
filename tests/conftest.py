import os
import tempfile
from pathlib import Path

import pytest
import torch

# The data set beside the checkout (../shared/data); tests that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA_SKIP = "../shared/data not available"

# Triton kernels run on the CPU through its interpreter, which must be chosen before triton is
# first imported (any test module may import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU kernel's dispatch cache goes to a fresh folder: the suite neither reads decisions measured
# elsewhere nor writes into the user's ~/.cache.
os.environ.setdefault("SPARSESR_CACHE_DIR", tempfile.mkdtemp(prefix="sparsesr-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: on a busy 2-core machine a second intra-op thread only adds
    wake-up latency to every op (measured: export of EDSR-baseline 0.24 s with one thread, 17 s
    with two while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded_one_thread():
    """One thread (tiny tensors, shared cores) and torch's seed at 0, for each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def write_smooth_images(folder: Path, sizes: list[tuple[int, int]], small: tuple[int, int] = (6, 7), seed: int = 0) -> Path:
    """One PNG per (width, height) in ``sizes``: random ``small`` noise resized up (bicubic), so
    that SR has something smooth to learn. Returns ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, size in enumerate(sizes):
        noise = rng.integers(0, 256, size=(*small, 3), dtype=np.uint8)
        Image.fromarray(noise).resize(size, Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


def pytest_terminal_summary(terminalreporter) -> None:
    """Say loudly when the quality tests on real data did not run: a green run without them says
    nothing about the shipped models."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_DATA_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} tests on real data SKIPPED: {SHARED_DATA} not found", yellow=True)
