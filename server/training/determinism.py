"""Bit-identical seeded runs: pin what the threading libraries would otherwise choose while a run goes on.

The seed fixes the initialisation and the data order, but the numbers also depend on how many threads
compute them: torch splits a large reduction into one chunk per intra-op thread, so another thread count
adds in another order and rounds differently (on the demo model, a 64-token projected prefix trained with
8 threads differs from the same run with 1 to 4). Two libraries may change the thread count at run time:

- GNU OpenMP, when its dynamic adjustment is on (``OMP_DYNAMIC=true`` in the environment), sizes every
  parallel region as the number of cores minus the load average: the busier the machine, the fewer
  threads, and the other bits;
- MKL, torch's BLAS on x86, has a dynamic mode of its own, on by default (``MKL_VERBOSE=1`` shows
  ``Dyn:1``), in which it may use fewer threads than it was given.

Intel's conditions for run-to-run reproducibility are a fixed thread count with ``MKL_DYNAMIC`` and
``OMP_DYNAMIC`` off; ``pinned_threads`` establishes them for a run and also asks torch for deterministic
kernels (an operation that has none warns). A rerun is bit-identical with the same thread count, so the
count is recorded in ``training.json``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def pinned_threads(threads: int | None = None) -> Iterator[int]:
    """Run the body with ``threads`` intra-op threads (None: torch's current count), dynamic threading off
    and deterministic algorithms on; yields the thread count. Torch's own settings are restored afterwards;
    OpenMP's and MKL's dynamic modes stay off (they could only ever lower the thread count)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    count = threads or previous_threads
    disable_dynamic_threading()
    torch.set_num_threads(count)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield count
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)


def disable_dynamic_threading() -> None:
    """Switch OpenMP's and MKL's dynamic thread counts off in this process (where these libraries exist).

    Neither has a torch setting, and the environment variables are read when the libraries load (before
    any code of ours runs), so their C functions are called directly.
    """
    omp_set_dynamic = getattr(_process_symbols(), "omp_set_dynamic", None)  # torch loads OpenMP globally
    if omp_set_dynamic is not None:
        omp_set_dynamic(0)
    mkl_set_dynamic = getattr(_mkl_library(), "MKL_Set_Dynamic", None)  # the C interface: takes an int
    if mkl_set_dynamic is not None:
        mkl_set_dynamic(0)


def omp_dynamic() -> bool | None:
    """Whether OpenMP may change the thread count at run time; None where no OpenMP runtime is loaded."""
    omp_get_dynamic = getattr(_process_symbols(), "omp_get_dynamic", None)
    return None if omp_get_dynamic is None else bool(omp_get_dynamic())


def _process_symbols() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: a platform (Windows) without a process-wide namespace
        return None


def _mkl_library() -> ctypes.CDLL | None:
    """Torch's CPU library, into which MKL is linked statically (its symbols are not process-wide)."""
    if not torch.backends.mkl.is_available():
        return None
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.CDLL(str(path)) if path.is_file() else None
    except OSError:
        return None
