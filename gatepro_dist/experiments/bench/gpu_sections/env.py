"""Section ``env``: what the run ran on. Every value that this torch and this machine expose, null
for the others (it runs on a CPU too, where most are null).

cuBLAS: torch exposes no cuBLAS version; the section reads it from the pip package that ships the
library (``nvidia-cublas*``) and from the ``libcublas`` file this process has loaded after one matmul.
The driver comes from ``nvidia-smi`` when it is on the PATH.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata


def nvidia_smi() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    if done.returncode:
        return {"error": (done.stderr or done.stdout).strip()[-300:]}
    first = done.stdout.strip().splitlines()[0]
    return dict(zip(query.split(","), (v.strip() for v in first.split(","))))


def cublas() -> dict:
    """The cuBLAS this process uses: the pip package's version and the loaded library's file name."""
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name") or ""
        if name.lower().startswith("nvidia-cublas"):
            packages[name] = dist.version
    loaded = _loaded_libraries("libcublas")
    version = next(iter(packages.values()), None) or _version_from_file(loaded)
    return {"version": version, "packages": packages, "loaded": loaded}


def _loaded_libraries(stem: str) -> list[str]:
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if stem in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def _version_from_file(paths: list[str]) -> str | None:
    for path in paths:  # e.g. .../libcublas.so.13.0.2.14
        tail = path.rsplit(".so.", 1)
        if len(tail) == 2 and "Lt" not in path:
            return tail[1]
    return None


def _optional_version(module: str) -> str | None:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception:  # not installed, or it fails to import here
        return None
    return getattr(imported, "__version__", "unknown")


def describe_environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": cuda, "device_count": torch.cuda.device_count() if cuda else 0,
           "device_name": None, "capability": None, "memory_gib": None, "nccl": None, "cudnn": None,
           "driver": None, "nvidia_smi": nvidia_smi()}
    if env["nvidia_smi"] and "driver_version" in env["nvidia_smi"]:
        env["driver"] = env["nvidia_smi"]["driver_version"]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(props.total_memory / 2**30, 1))
        a = torch.ones(64, 64, device="cuda")
        (a @ a).sum().item()  # loads cuBLAS, so that its file shows in /proc/self/maps
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as err:  # a build without NCCL
            env["nccl"] = None
            env["nccl_error"] = f"{type(err).__name__}: {err}"
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["tf32_default"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        try:
            env["preferred_blas_library"] = str(torch.backends.cuda.preferred_blas_library())
        except Exception:  # older torch
            env["preferred_blas_library"] = None
    env["cublas"] = cublas() if cuda else None
    env["megatron_core"] = _optional_version("megatron.core")
    env["transformer_engine"] = _optional_version("transformer_engine")
    return env


def environment(options: dict, note) -> dict:
    return {**describe_environment(), "passed": True}
