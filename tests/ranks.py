"""Two gloo processes on one machine, for the distributed tests: ``run_ranks(scenario, tmp_path, *args)``.

Workers start from a fork server that has imported this module (and so torch and autoprec) once, so a
worker starts in well under a second; each worker writes its result to a file, and the test asserts
in the parent. A worker that fails stops the other one; a hang fails the test at its deadline
instead of blocking the run. ``scenario`` must be a module-level function (workers import it).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import autoprec  # noqa: F401  (preloaded by the fork server with this module)

__all__ = ["DEADLINE_S", "WORLD", "free_port", "run_ranks"]

WORLD = 2
DEADLINE_S = 120.0        # per test: a hung collective fails the test here


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(scenario: Callable[..., dict], rank: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # gloo on the loopback device, whatever the hostname says
        names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
        for lo in ("lo", "lo0"):
            if lo in names:
                os.environ["GLOO_SOCKET_IFNAME"] = lo
                break
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = scenario(rank, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(scenario: Callable[..., dict], tmp_path: Path, *args: Any) -> list[dict]:
    """Run ``scenario(rank, *args)`` in two gloo processes; their results, by rank."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # import torch and autoprec once, not per worker
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(scenario, rank, port, str(tmp_path), args), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    timed_out = False
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it in a collective until gloo's timeout
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=left)
    finally:
        alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    errors = "\n".join(f"rank {r}:\n{(tmp_path / f'rank{r}.err').read_text()}"
                       for r in range(WORLD) if (tmp_path / f"rank{r}.err").exists())
    assert not timed_out, f"ranks {alive} still running after {DEADLINE_S:.0f} s (a hang?)\n{errors}"
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs), f"workers' exit codes: {[p.exitcode for p in procs]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


# -- DDP --------------------------------------------------------------------------------------
