"""What a GPU run ran on: ``nvidia-smi -L``, torch and its CUDA, the device, the TF32 settings (flags and the
environment overrides that force them), and where optuna was imported from (the carried wheels, or the image).
Printed, and written to ``OUT/machine.json``.

Run:  python benchmarks/gpu/machine.py OUT [--require-cuda]   # exit 1 where --require-cuda finds no GPU, or
                                                              # optuna (autoprec's dependency) does not import
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any


def describe() -> dict[str, Any]:
    """This machine as the GPU run reports it.

    Example:
        >>> d = describe()
        >>> isinstance(d["cuda_available"], bool) and d["torch"].count(".") >= 2
        True
    """
    import torch

    smi = shutil.which("nvidia-smi")
    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "nvidia_smi": subprocess.run([smi, "-L"], check=False, capture_output=True, text=True).stdout.strip() if smi else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_env": {k: os.environ.get(k) for k in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE")},
    }
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import optuna
        out["optuna"] = {"version": optuna.__version__, "file": optuna.__file__}
    except ImportError as e:
        out["optuna"] = {"error": str(e)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for machine.json")
    p.add_argument("--require-cuda", action="store_true", help="exit 1 without a CUDA GPU")
    args = p.parse_args(argv)
    d = describe()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "machine.json"), "w") as f:
        json.dump(d, f, indent=1)
    for k, v in d.items():
        print(f"{k}: {v}")
    problems = (["no CUDA GPU"] if args.require_cuda and not d["cuda_available"] else []) + \
        ([f"optuna does not import: {d['optuna']['error']}"] if "error" in d["optuna"] else [])
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
