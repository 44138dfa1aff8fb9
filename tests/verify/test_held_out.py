"""The held-out check (autoprec.verify._held_out): tune's policy measured on data its decisions were not made on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import autoprec
from autoprec.core import leading_rows
from autoprec.device import roofline
from autoprec.verify import split

ALWAYS_PAYS = roofline(fp32_flops=19.5e12, low_speedup=8.0, bandwidth=1e18, launch=0.0, region=0.0,
                       device="test GPU: every 16-bit layer faster")


class Regressor(nn.Module):
    """A two-layer MLP; the batch is (x, target) and the model ignores the target."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (out - batch[1]).square().mean()


def near_fit_batch(rows: int = 16, near: int = 4) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A batch whose last ``near`` rows have targets within 1e-5 of the FP32 output, the others 1 away.

    A 16-bit rounding of the output (~4e-3 of it) is ~400 times those rows' residual, so their gradients are
    mostly rounding error, by construction on every CPU; the other rows' residuals dwarf it. Held out by rows
    (the last quarter), the near rows are exactly what the decisions did not see."""
    torch.manual_seed(0)
    model = Regressor()
    x = torch.randn(rows, 16) * 3
    with torch.no_grad():
        out = model(x)
    residual = torch.ones(rows, 16)
    residual[rows - near:] = 1e-5
    return model, (x, out + residual * torch.sign(torch.randn(rows, 16)))


def _tune(model, batch, **kw):
    return autoprec.tune(model, batch, mse, target="cuda", profile=ALWAYS_PAYS, progress=False, verify_steps=0,
                         measure_speed=False, **kw)


# -- the split --------------------------------------------------------------------------------------------------------
def test_split_holds_out_the_last_batches_or_a_quarter_of_the_rows():
    """Several batches: the last quarter of them (at least one); one batch: a quarter of its rows (at least 2)."""
    bs = [torch.full((4, 2), float(i)) for i in range(8)]
    s = split(bs, 0.25, accepts=lambda part: "")
    assert (s.what, len(s.decide), [float(b[0, 0]) for b in s.held]) == ("2 of 8 batches", 6, [6.0, 7.0])
    assert split(bs[:2], 0.25, accepts=lambda part: "").what == "1 of 2 batches"
    one = {"x": torch.arange(20.0).reshape(10, 2), "y": torch.arange(10), "scale": 2.0}
    s = split([one], 0.25, accepts=lambda part: "")
    assert s.what == "2 of 10 rows"  # round(2.5) = 2
    assert s.held[0]["y"].tolist() == [8, 9] and s.decide[0]["y"].tolist() == list(range(8))
    assert s.held[0]["scale"] == 2.0


@pytest.mark.parametrize("batch, fraction, accepts, why", [
    ((torch.ones(8, 2), torch.ones(2, 30)), 0.25, "", "do not share a leading (row) size"),
    (torch.ones(3, 2), 0.25, "", "a batch of 3 rows is too small to hold rows out (4 or more)"),
    (torch.ones(8, 2), 0.25, "shape mismatch", ("the model or loss does not take part of the batch's rows "
                                                "(shape mismatch)")),
    (torch.ones(8, 2), 0.0, "", "held_out=0: nothing was held out"),
], ids=["ragged", "small", "refused", "off"])
def test_split_says_why_it_held_nothing_out(batch, fraction, accepts, why):
    """A batch that cannot be split is not split, and the record says why and what to do."""
    s = split([batch], fraction, accepts=lambda part: accepts)
    assert s.held == [] and why in s.skipped
    assert s.record().skipped == s.skipped and s.record().passed
    if fraction:
        assert "batches=" in s.skipped


def test_leading_rows_ignores_scalars_and_sees_ragged_batches():
    assert leading_rows(torch.ones(5, 3)) == 5
    assert leading_rows([torch.ones(5, 3), torch.tensor(1.0), "text"]) == 5
    assert leading_rows([torch.ones(5, 3), torch.ones(4)]) is None


def test_a_loss_closed_over_a_fixed_target_keeps_the_whole_batch():
    """loss_fn(output, batch) that ignores the batch (a fixed target of 8 rows) cannot score 6 rows: no split."""
    torch.manual_seed(0)
    model, target = Regressor(), torch.randn(8, 16)
    policy = autoprec.tune(model, torch.randn(8, 16), lambda out, b: (out - target).square().mean(), progress=False,
                           verify_steps=0, measure_speed=False)
    assert "does not take part of the batch's rows" in policy.held_out.skipped
    assert policy.stats["held_out_passes"] == 0


# -- the check inside tune ---------------------------------------------------------------------------------------------
def test_the_check_backs_off_what_fails_on_rows_it_did_not_see():
    """The near-fit rows held out: the searched policy fails there, layers go back to FP32 until it holds."""
    model, batch = near_fit_batch()
    policy = _tune(model, batch)
    h = policy.held_out
    assert h.held == "4 of 16 rows" and not h.skipped
    assert h.first_grad_err > 0.05 >= h.grad_err  # failed before the back-off, holds after it
    assert h.tuning_grad_err <= 0.05 and h.margin > 1
    assert h.backed_off and h.rounds >= 2 and h.passed
    for key in h.backed_off:
        entry = policy.layers[key]
        assert (entry.precision, entry.reason, entry.excluded) == ("fp32", "held-out back-off", False)
        assert "on the 4 of 16 rows held out: the policy's loss err" in entry.detail
    assert policy.stats["held_out_passes"] == 1 + 1 + (h.rounds - 1)  # FP32 reference, policy, each back-off


def test_switched_off_it_ships_the_searched_policy():
    """held_out=0: the decisions see all rows, nothing is checked, and the record says so."""
    model, batch = near_fit_batch()
    policy = _tune(model, batch, held_out=0)
    assert policy.held_out.skipped == "held_out=0: nothing was held out"
    assert policy.stats["held_out_passes"] == 0 and not policy.held_out.backed_off


def test_a_policy_that_holds_is_not_changed_and_both_figures_are_reported(tmp_path):
    """On benign rows nothing is backed off; the report, the CLI summary and the file carry both figures."""
    torch.manual_seed(0)
    model, x = Regressor(), torch.randn(16, 16)
    policy = _tune(model, (x, torch.randn(16, 16)))
    h = policy.held_out
    assert h.held == "4 of 16 rows" and h.backed_off == () and h.rounds == 1 and h.passed
    assert h.grad_err <= 0.05 and h.first_grad_err == h.grad_err
    assert policy.stats["held_out_passes"] == 2
    text = policy.report()
    assert "## Held-out check (data the decisions were not made on)" in text
    assert "**PASSED** on 4 of 16 rows held out" in text and "on the tuning data" in text
    path = tmp_path / "p.json"
    policy.save(path)
    assert autoprec.load(path).held_out == h
    data = json.loads(path.read_text())
    del data["held_out"]  # a file written before the check: loads, without a record
    path.write_text(json.dumps(data))
    assert autoprec.load(path).held_out is None


@pytest.mark.parametrize("value", [1.0, -0.1, "a quarter", True], ids=["one", "negative", "text", "bool"])
def test_bad_held_out_is_refused_with_the_fix(value):
    with pytest.raises(autoprec.OptionError, match=r"held_out=.* must be a fraction in \[0, 1\): the share of the "
                                                   r"batches .* 0 switches the check off"):
        autoprec.tune(Regressor(), torch.ones(8, 16), held_out=value)
