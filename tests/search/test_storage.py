"""Studies shared through storage: two worker processes tune on one Optuna journal file."""

from __future__ import annotations

import json
import multiprocessing as mp

import optuna
import pytest

import autoprec
from autoprec.search import open_storage
from tests.models import transformer_block


def _tune(storage: str | None, out: str | None = None) -> dict:
    model, batch, loss_fn = transformer_block(batch_size=8)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", progress=False, verify_steps=0, n_trials=8,
                           storage=storage)
    result = {"assignment": policy.assignment, "trials": policy.stats["trials"],
              "search_passes": policy.stats["search_passes"]}
    if out is not None:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
    return result


def _worker(storage: str, out: str, start) -> None:
    start.wait(60)  # both workers begin together
    _tune(storage, out)


def test_two_workers_share_one_journal_study(tmp_path):
    """Two processes tune the same model on one journal file at once: both return the single-process policy,
    their trials land in one study, and a later run finds every trial measured (no search pass of its own)."""
    journal = f"journal:{tmp_path / 'study.log'}"
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    start = ctx.Event()
    outs = [str(tmp_path / f"worker{i}.json") for i in range(2)]
    procs = [ctx.Process(target=_worker, args=(journal, out, start), daemon=True) for out in outs]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    workers = [json.load(open(out, encoding="utf-8")) for out in outs]

    alone = _tune(None)
    assert workers[0]["assignment"] == workers[1]["assignment"] == alone["assignment"]
    summaries = optuna.get_all_study_summaries(open_storage(journal))
    assert len(summaries) == 1  # one study: same model, batch, loss and settings
    study = optuna.load_study(study_name=summaries[0].study_name, storage=open_storage(journal))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all("loss_err" in t.user_attrs for t in done)
    # the worker that finished last saw every trial of both (how they split the work depends on timing:
    # one may find the whole budget measured by the other and run none)
    assert len(study.trials) == max(w["trials"] for w in workers) >= alone["trials"]
    assert all(w["search_passes"] <= alone["search_passes"] for w in workers)  # none measured more than alone
    again = _tune(journal)
    assert again["assignment"] == alone["assignment"] and again["search_passes"] == 0


def test_a_journal_in_a_missing_folder_is_refused_before_work(tmp_path):
    """A journal path whose folder does not exist fails at once, naming the folder."""
    model, batch, loss_fn = transformer_block(batch_size=8)
    with pytest.raises(autoprec.OptionError, match=r"the folder '.*nowhere' does not exist"):
        autoprec.tune(model, batch, loss_fn, storage=f"journal:{tmp_path / 'nowhere' / 'study.log'}", progress=False)
    with pytest.raises(autoprec.OptionError, match=r"names no file: use 'journal:/path/to/study.log'"):
        autoprec.tune(model, batch, loss_fn, storage="journal:", progress=False)
