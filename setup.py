"""Build script: package mapping and the optional compiled CPU kernel.

kernels/ ships as ``sparsesr.kernels``. The C extension in kernels/cpu is optional:
when it cannot be compiled (no compiler, unsupported platform) installation still
succeeds and the runtime falls back to dense convolution.
"""
from __future__ import annotations

import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = ["sparsesr"] + [f"sparsesr.{p}" for p in find_packages("sparsesr")]
    kernel_packages = ["sparsesr.kernels"] + [f"sparsesr.kernels.{p}" for p in find_packages("kernels")]
    package_dir = {"sparsesr": "sparsesr"}
    for name in kernel_packages:
        package_dir[name] = "kernels/" + "/".join(name.split(".")[2:]) if name != "sparsesr.kernels" else "kernels"
    return packages + kernel_packages, package_dir


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install because of them."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "no CPU kernel"
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc: Exception) -> None:
        sys.stderr.write(
            f"WARNING: sparsesr's CPU sparse kernel was not built ({exc}); "
            "the runtime will use dense convolution on the CPU.\n"
        )


def _extensions() -> list[Extension]:
    """The CPU sparse convolution kernel (kernels/cpu/*.c), plain C11 + POSIX threads.

    No torch headers: pip builds in an isolated environment that has no torch. The AVX2 and
    AVX-512 code paths use function target attributes, so no -march flag is needed.
    """
    if os.environ.get("SPARSESR_NO_EXTENSION") or sys.platform == "win32":
        return []  # win32: no pthreads/stdatomic in MSVC's C; the runtime falls back to dense
    cpu_dir = os.path.join("kernels", "cpu")
    if not os.path.isdir(cpu_dir):
        return []
    sources = sorted(os.path.join(cpu_dir, f) for f in os.listdir(cpu_dir) if f.endswith(".c"))
    headers = sorted(os.path.join(cpu_dir, f) for f in os.listdir(cpu_dir) if f.endswith(".h"))
    if not sources:
        return []
    flags = ["-O3", "-std=c11", "-pthread"]
    flags += os.environ.get("SPARSESR_CPU_CFLAGS", "").split()  # e.g. -fsanitize=address
    return [
        Extension(
            "sparsesr.kernels.cpu._sparseconv",
            sources=sources,
            depends=headers,
            extra_compile_args=flags,
            extra_link_args=["-pthread"] + os.environ.get("SPARSESR_CPU_LDFLAGS", "").split(),
        )
    ]


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
