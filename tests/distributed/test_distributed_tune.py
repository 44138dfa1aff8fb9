"""``tune`` on two gloo processes: the probe's and the search's passes split, one policy on every rank.

The two-process harness (fork server, one result file per rank, a deadline instead of a hang) is
:mod:`tests.ranks`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

import autoprec
from tests.models import transformer_block
from tests.ranks import WORLD, run_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

OPTIONS = dict(target="cuda", progress=False, verify_steps=3, n_trials=8)


def _summary(policy: autoprec.Policy) -> dict:
    """What the ranks must agree on, and what each of them ran (plain data: the harness loads it weights-only)."""
    return {"assignment": policy.assignment,
            "scaler": None if policy.scaler is None else vars(policy.scaler),
            "passed": policy.verification.passed if policy.verification is not None else None,
            "evidence": {key: e.measured for key, e in policy.layers.items()},
            "counts": {k: policy.stats[k] for k in ("probe_passes", "search_passes", "verify_passes", "trials",
                                                     "candidates", "world_size")},
            "measured": [policy.stats["measured_loss_err"], policy.stats["measured_grad_err"]]}


def _tune_on_rank(rank: int, storage: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, batch, loss_fn = transformer_block(batch_size=8)
    refused = ""
    try:
        autoprec.tune(model, batch, loss_fn, storage=storage, **OPTIONS)
    except autoprec.OptionError as exc:
        refused = str(exc)
    ddp = DDP(model)  # as a training script has it: tune's private copy is unwrapped, its backward syncs nothing
    return {"refused": refused, **_summary(autoprec.tune(ddp, batch, loss_fn, **OPTIONS))}


def _close_rows(a: dict, b: dict) -> bool:
    """Two evidence tables (layer -> format -> figure) agree up to float noise."""
    if a.keys() != b.keys():
        return False
    for layer, fmts in a.items():
        if fmts.keys() != b[layer].keys():
            return False
        for fmt, row in fmts.items():
            other = b[layer][fmt]
            if row.keys() != other.keys() or not all(
                    math.isclose(row[f], other[f], rel_tol=1e-6, abs_tol=1e-12) for f in row):
                return False
    return True


def test_two_ranks_return_the_single_process_policy_with_half_the_passes(tmp_path, one_thread):
    """Two gloo ranks tuning a DDP-wrapped model return the same policy as one process (assignment, scaler,
    trials, evidence), each running half the probe's layer passes and its share of the search's; a storage
    is refused."""
    storage = f"journal:{tmp_path / 'study.log'}"
    r0, r1 = run_ranks(_tune_on_rank, tmp_path, storage)
    model, batch, loss_fn = transformer_block(batch_size=8)
    alone = _summary(autoprec.tune(model, batch, loss_fn, **OPTIONS))

    for r in (r0, r1):
        assert "storage=" in r["refused"] and "2 ranks" in r["refused"] and "storage=None" in r["refused"]
        assert r["assignment"] == alone["assignment"] and r["scaler"] == alone["scaler"]
        assert r["passed"] == alone["passed"] is True
        assert r["counts"]["trials"] == alone["counts"]["trials"]
        assert r["counts"]["world_size"] == WORLD and alone["counts"]["world_size"] == 1
        assert _close_rows(r["evidence"], alone["evidence"])
        assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) for x, y in zip(r["measured"], alone["measured"]))
        assert r["counts"]["verify_passes"] == alone["counts"]["verify_passes"]  # verification runs on every rank
    assert "fp16" in alone["assignment"].values()  # a real search: some layers cast, with a scaler
    assert r0["assignment"] == r1["assignment"] and r0["evidence"] == r1["evidence"]

    # probe: one FP32 reference pass on every rank, the candidates x formats passes split in halves
    layer_passes = alone["counts"]["probe_passes"] - 1
    assert layer_passes == 2 * alone["counts"]["candidates"]   # two formats (fp16, bf16) for a CUDA target
    assert [r["counts"]["probe_passes"] - 1 for r in (r0, r1)] == [layer_passes // 2, layer_passes - layer_passes // 2]
    # search: every trial TPE asks for is measured once, by one rank (its first trials are predictable)
    searched = [r["counts"]["search_passes"] for r in (r0, r1)]
    assert alone["counts"]["search_passes"] >= 2
    assert sum(searched) == alone["counts"]["search_passes"] and abs(searched[0] - searched[1]) <= 1


def _timed_on_rank(rank: int) -> dict:
    from dataclasses import asdict

    model, batch, loss_fn = transformer_block(batch_size=2, seq_len=16)
    policy = autoprec.tune(model, batch, loss_fn, target="cpu", progress=False, verify_steps=2, n_trials=4,
                           measure_speed=True)
    return {"assignment": policy.assignment, "speed": asdict(policy.speed)}


def test_rank_0s_step_timing_decides_for_every_rank(tmp_path):
    """With step timing on, every rank ships the same assignment and carries rank 0's measured figures."""
    r0, r1 = run_ranks(_timed_on_rank, tmp_path)
    assert r0["assignment"] == r1["assignment"]
    assert r0["speed"] == r1["speed"] and r0["speed"]["source"] == "measured"
    assert {"fp32", "policy"} <= set(r0["speed"]["seconds"])


def _tune_other_batch(rank: int) -> dict:
    model, batch, loss_fn = transformer_block(batch_size=8, seed=rank)  # each rank its own data: not one problem
    try:
        autoprec.tune(model, batch, loss_fn, **OPTIONS)
    except autoprec.RankError as exc:
        return {"error": str(exc)}
    return {"error": ""}


def test_ranks_with_different_inputs_fail_on_every_rank(tmp_path):
    """Ranks given different models/batches raise RankError on both (no hang, no silently mixed policy)."""
    for r in run_ranks(_tune_other_batch, tmp_path):
        assert "differs between the ranks" in r["error"] and "same model, batch and loss on every rank" in r["error"]


# (open layers, bound on k^2 / 1000, seed): studies that run past TPE's first, result-blind trials
STUDIES = [(6, 0.01, 0), (40, 0.3, 2), (100, 1.0, 0)]


def _study(n: int, bound: float, seed: int, ranks=None) -> dict:
    """The search's study on a synthetic problem (error k^2 / 1000): what it asked for and what each rank measured."""
    from autoprec.search import run_split_study, run_study

    measured: list[int] = []

    def measure(k: int) -> tuple[float, float, bool]:
        measured.append(k)
        return (k * k / 1000, 0.0, True)

    def feasible(r: tuple[float, float, bool]) -> bool:
        return r[0] <= bound

    def value(k: int, r: tuple[float, float, bool]) -> float:
        return -float(k) if feasible(r) else 1000.0 + r[0]

    cache: dict = {}

    def evaluate(k: int) -> tuple[float, float, bool]:  # as autoprec.search's: k = 0 is FP32, no pass
        if k not in cache:
            cache[k] = measure(k) if k else (0.0, 0.0, True)
        return cache[k]

    if ranks is None:
        trials = run_study("s", n, n // 2, evaluate, cache, value, n_trials=30, storage=None, seed=seed,
                            progress=None)
    else:
        trials = run_split_study(n, n // 2, measure, cache, value, feasible, n_trials=30, seed=seed, ranks=ranks)
    return {"trials": trials, "asked": sorted(cache), "measured": measured}


def _studies_on_rank(rank: int) -> dict:
    from autoprec.distributed import current

    return {spec: _study(*spec, ranks=current()) for spec in STUDIES}


def test_the_split_study_asks_what_one_process_asks(tmp_path):
    """On two ranks the search's study asks for the same k as in one process, trial for trial, also past
    TPE's result-blind first trials; each k is measured by one rank, and few predictions go unused."""
    r0, r1 = run_ranks(_studies_on_rank, tmp_path)
    for spec in STUDIES:
        alone, a, b = _study(*spec), r0[spec], r1[spec]
        assert a["trials"] == b["trials"] == alone["trials"] and a["asked"] == b["asked"] == alone["asked"]
        both = a["measured"] + b["measured"]
        assert len(both) == len(set(both)), "a k was measured twice"
        assert set(alone["measured"]) <= set(both) and len(both) <= len(alone["measured"]) + 3, spec
        assert abs(len(a["measured"]) - len(b["measured"])) <= 1


def _fail_on_rank_1(rank: int) -> dict:
    from autoprec.distributed import current

    ranks = current()
    out = {"rank": ranks.rank, "world": ranks.world, "share": ranks.share(list(range(5))),
           "gathered": ranks.gather(rank * 10)}

    def work() -> int:
        if rank == 1:
            raise ValueError("no such layer")
        return rank

    try:
        ranks.run(work, "the probe")
    except Exception as exc:  # noqa: BLE001 - the test reports what each rank raised
        out["raised"] = f"{type(exc).__name__}: {exc}"
    out["after"] = ranks.gather("still in step")  # both ranks made the same collectives: none is left waiting
    return out


def test_a_failure_on_one_rank_raises_on_every_rank(tmp_path):
    """Work that fails on rank 1 raises its own error there and a RankError naming rank 1 on rank 0."""
    r0, r1 = run_ranks(_fail_on_rank_1, tmp_path)
    assert [r0["share"], r1["share"]] == [[0, 2, 4], [1, 3]] and r0["gathered"] == r1["gathered"] == [0, 10]
    assert r1["raised"] == "ValueError: no such layer"
    assert r0["raised"].startswith("RankError: the probe failed on rank 1 of 2 (ValueError: no such layer)")
    assert r0["after"] == r1["after"] == ["still in step"] * WORLD


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)   # every rank builds the same model and batch
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 8))
        return model, torch.randn(64, 64)
''')


def test_cli_under_torchrun_writes_one_policy(tmp_path):
    """`torchrun --nproc-per-node 2 -m autoprec tune` tunes on two ranks: rank 0 writes the policy and prints,
    and the policy is the one a single process writes."""
    (tmp_path / "factories.py").write_text(FACTORY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["tune", "factories:make", "--target", "cuda", "--verify-steps", "3", "--budget", "8", "--quiet"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(WORLD), "-m", "autoprec", *args, "--out", "ranks.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ranks.json") == 1   # rank 0 alone prints
    one = subprocess.run([sys.executable, "-m", "autoprec", *args, "--out", "one.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    ranks, alone = (json.loads((tmp_path / f).read_text()) for f in ("ranks.json", "one.json"))
    assert autoprec.load(tmp_path / "ranks.json").assignment == autoprec.load(tmp_path / "one.json").assignment
    assert ranks["stats"]["world_size"] == WORLD and alone["stats"]["world_size"] == 1
    assert ranks["stats"]["probe_passes"] < alone["stats"]["probe_passes"]
    assert "(passes: one rank's of 2, tuned under torch.distributed)" in autoprec.load(tmp_path / "ranks.json").report()


def _blocks(depth: int = 4):
    """Pre-LN residual MLP blocks (the structure-sharing case: one role per block layer)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(depth)], nn.Linear(32, 4))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    return model, x


def _tune_blocks_on_rank(rank: int) -> dict:
    model, x = _blocks()
    return _summary(autoprec.tune(model, x, **OPTIONS))


def test_two_ranks_share_the_roles_of_repeated_blocks(tmp_path, one_thread):
    """With structure sharing, the ranks deal out the (role or layer, format) measurements: the single-process
    policy on both, and the probe's measurement passes of one process split between them."""
    r0, r1 = run_ranks(_tune_blocks_on_rank, tmp_path)
    model, x = _blocks()
    policy = autoprec.tune(model, x, **OPTIONS)
    alone = _summary(policy)
    assert policy.stats["probe_shared"] > 0  # roles were measured as groups
    for r in (r0, r1):
        assert r["assignment"] == alone["assignment"] and _close_rows(r["evidence"], alone["evidence"])
    measured = [r["counts"]["probe_passes"] - 1 for r in (r0, r1)]  # without each rank's reference pass
    assert sum(measured) == alone["counts"]["probe_passes"] - 1 and min(measured) >= 1
