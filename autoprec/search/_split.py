"""The search's trials on several ranks: each round, the ranks measure different ``k`` at once.

TPE is sequential: which ``k`` a trial asks for depends on what the trials before it measured. To
split its passes across ranks and still end where one process would, every rank runs the
single-process study itself (same sampler seed, same enqueued guesses, same objective, trial by
trial) on a table of measurements that all ranks share:

1. a trial asks for ``k``: if the table has it, the trial is told its value and the study goes on;
2. if not, every rank *predicts* the next ``world - 1`` distinct unmeasured ``k`` the study will ask
   for: a scratch copy of the study (its finished trials, the sampler's state) goes on with guessed
   results (a monotone guess: casting fewer layers than a feasible ``k`` is feasible, casting more
   than an infeasible one is not). The predictions are exact for TPE's first trials, which it draws
   independently of the results, and often right after;
3. rank ``i`` measures the ``i``-th of ``[k, *predictions]`` (a rank with none measures nothing),
   the results are gathered into every rank's table, and the trial is told its value.

Only the ``k`` the study asked for count as trials: a prediction it never asked for is measured in
vain but is not a candidate for the choice, so the choice is one process's. Every rank runs the
same study on the same table, so each makes the same collectives and chooses the same ``k``. A
prediction costs a copy of the study and a few of the sampler's trials (milliseconds).
"""

from __future__ import annotations

import logging
from typing import Callable

from ..distributed._ranks import Ranks

__all__ = ["run_split_study"]

log = logging.getLogger("autoprec.search")

Result = tuple[float, float, bool]   # (loss_err, grad_err, finite)


def run_split_study(n: int, greedy: int, measure: Callable[[int], Result], cache: dict[int, Result],
                    value: Callable[[int, Result], float], feasible: Callable[[Result], bool], *, n_trials: int,
                    seed: int, ranks: Ranks, progress: Callable[[int, int], None] | None = None) -> int:
    """TPE over ``k`` in ``[0, n]`` as :func:`autoprec.search` runs it in one process, its passes split
    across ``ranks``; fills ``cache`` with the ``k`` the study asked for and returns its trial count.

    ``measure(k)`` runs one forward+backward casting the ``k`` least sensitive layers; ``value(k,
    result)`` is the objective, ``feasible(result)`` whether a result is within the bound.

    Example:
        >>> errs = {k: (0.002 * k, 0.0, True) for k in range(9)}   # error grows with k; bound 0.01
        >>> cache = {}
        >>> run_split_study(8, 4, errs.__getitem__, cache, lambda k, r: -k if r[0] <= 0.01 else 100.0,
        ...                 lambda r: r[0] <= 0.01, n_trials=5, seed=0, ranks=Ranks())
        5
        >>> max(k for k, r in cache.items() if r[0] <= 0.01)
        5
    """
    import optuna

    known: dict[int, Result] = {0: (0.0, 0.0, True)}   # k = 0 casts nothing: FP32 itself, no pass
    budget = min(n_trials, n + 1)
    asked: list[int] = []
    rounds = 0
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        for guess in dict.fromkeys([greedy, n]):
            study.enqueue_trial({"k": guess})
        if progress is not None:  # the plan, before the first trial
            progress(0, budget)
        for i in range(budget):
            trial = study.ask()
            k = trial.suggest_int("k", 0, n)
            asked.append(k)
            if k not in known:
                batch = [k] + _predict(study, k, n, known, value, feasible, trials=budget - i - 1,
                                       want=ranks.world - 1)
                mine = ranks.share(batch)   # one k per rank at most
                for part in ranks.run(lambda: [(j, measure(j)) for j in mine], "a search trial"):
                    known.update(part)
                rounds += 1
            study.tell(trial, value(k, known[k]))
            if progress is not None:
                progress(i + 1, budget)
    finally:
        optuna.logging.set_verbosity(verbosity)
    cache.update({k: known[k] for k in asked})
    log.info("search on %d ranks: %d rounds, %d trials, %d k measured beyond the study's (predictions)",
             ranks.world, rounds, len(asked), len(set(known) - set(asked)))
    return len(asked)


def _predict(study, k: int, n: int, known: dict[int, Result], value: Callable[[int, Result], float],
             feasible: Callable[[Result], bool], *, trials: int, want: int) -> list[int]:
    """The next ``want`` distinct unmeasured ``k`` (other than ``k``) that ``study`` is likely to ask for
    in its next ``trials`` trials, were ``k``'s result the guessed one; ``study`` is left as it is."""
    import copy

    import optuna

    if want <= 0 or trials <= 0:
        return []
    scratch = optuna.create_study(direction="minimize", sampler=copy.deepcopy(study.sampler))
    scratch.add_trials(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    scratch.add_trial(optuna.trial.create_trial(params={"k": k},
                                                distributions={"k": optuna.distributions.IntDistribution(0, n)},
                                                value=value(k, _guess(k, known, feasible))))
    for waiting in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        scratch.enqueue_trial(waiting.system_attrs["fixed_params"])   # enqueued guesses not yet asked
    found: list[int] = []
    for _ in range(trials):
        trial = scratch.ask()
        j = trial.suggest_int("k", 0, n)
        if j not in known and j != k and j not in found:
            found.append(j)
            if len(found) == want:
                break
        scratch.tell(trial, value(j, known[j] if j in known else _guess(j, known, feasible)))
    return found


def _guess(k: int, known: dict[int, Result], feasible: Callable[[Result], bool]) -> Result:
    """A prediction for an unmeasured ``k``: the error grows with the number of layers cast."""
    above = [j for j, r in known.items() if j > k and feasible(r)]
    if above:
        return known[min(above)]
    below = [j for j, r in known.items() if j < k and not feasible(r)]
    if below:
        return known[max(below)]
    return known[max(j for j in known if j < k)]   # k = 0 is always known
