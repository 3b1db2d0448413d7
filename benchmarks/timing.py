"""Fair side-by-side timing (../shared/BENCHMARKING.md): same process, same inputs, tools
alternated A B A B …, medians after a warm-up, outputs consumed."""

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1, device: str = "cpu"
) -> dict[str, float]:
    """Median wall time (s) of each zero-argument function, run in alternation."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            out = fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
            del out
    return {k: statistics.median(v) for k, v in times.items()}


# large blocks straight from mmap and back to the OS on free, so that RSS follows live memory;
# set in the environment of a fresh process that measures with `peak_rss_growth`
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_rss_growth(fn: Callable[[], object]) -> float:
    """Peak RSS growth (MiB) while fn runs: the kernel's high-water mark (VmHWM) is reset
    first (writing 5 to clear_refs), so earlier peaks (imports, data set-up) do not hide it.
    Linux only; run fn once before to leave lazy imports and allocator pools out."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - base


def versions() -> dict[str, str]:
    """Versions of torch and every peer that imports."""
    import importlib.metadata as md
    import platform

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
    }
    for pkg in (
        "amortized",
        "qpth",
        "proxsuite",
        "cvxpylayers",
        "diffcp",
        "cvxpy",
        "clarabel",
        "scs",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
