"""The search's trials on several ranks: each round, the ranks measure different ``k`` at once.

TPE is sequential: which ``k`` a trial asks for depends on what the trials before it measured. To
split its passes across ranks and still end where one process would, every rank *replays* the
single-process study from the start (same sampler seed, same enqueued guesses, same objective)
on the measurements all ranks hold so far:

1. the replay runs trials until it asks for ``k`` nobody has measured; from there it goes on with
   guessed results (a monotone guess: casting fewer layers than a feasible ``k`` is feasible,
   casting more than an infeasible one is not), collecting the next ``world`` distinct unmeasured
   ``k``. The first is certainly the next one the study needs; the rest are predictions (exact for
   TPE's first trials, which it draws independently of the results);
2. rank ``i`` measures the ``i``-th of them (a rank with none measures nothing) and the results are
   gathered into every rank's table;
3. repeat until a replay runs its whole budget on measured ``k``: that replay *is* the
   single-process study, trial for trial, and only the ``k`` it asked for count as trials (a
   prediction the study never asked for is not a candidate for the choice).

Every rank replays the same trials on the same table, so each makes the same collectives and
chooses the same ``k``. A replay costs the sampler's time for the trials before the first
unmeasured one (a few milliseconds per trial), small beside a forward+backward of a real model.
"""

from __future__ import annotations

import logging
from typing import Callable

from .ranks import Ranks

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
    known: dict[int, Result] = {0: (0.0, 0.0, True)}   # k = 0 casts nothing: FP32 itself, no pass
    budget = min(n_trials, n + 1)
    rounds = 0
    while True:
        asked, missing = _replay(n, greedy, known, value, feasible, budget=budget, seed=seed, want=ranks.world)
        if progress is not None:   # the trials before the first unmeasured k are done
            progress(asked.index(missing[0]) if missing else len(asked), budget)
        if not missing:
            break
        rounds += 1
        mine = ranks.share(missing)   # one k per rank at most: the ranks beyond len(missing) measure nothing
        for part in ranks.run(lambda: [(k, measure(k)) for k in mine], "a search trial"):
            known.update(part)
    cache.update({k: known[k] for k in asked})
    extra = len(set(known) - set(asked))
    log.info("search on %d ranks: %d rounds, %d trials, %d k measured beyond the study's (predictions)",
             ranks.world, rounds, len(asked), extra)
    return len(asked)


def _replay(n: int, greedy: int, known: dict[int, Result], value: Callable[[int, Result], float],
            feasible: Callable[[Result], bool], *, budget: int, seed: int, want: int) -> tuple[list[int], list[int]]:
    """Run the study from scratch on ``known``: the ``k`` of its trials, and the first ``want`` unmeasured ``k``."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        for guess in dict.fromkeys([greedy, n]):
            study.enqueue_trial({"k": guess})
        asked: list[int] = []
        missing: list[int] = []
        for _ in range(budget):
            trial = study.ask()
            k = trial.suggest_int("k", 0, n)
            asked.append(k)
            if k in known:
                result = known[k]
            else:
                if k not in missing:
                    missing.append(k)
                    if len(missing) == want:
                        break
                result = _guess(k, known, feasible)
            study.tell(trial, value(k, result))
        return asked, missing
    finally:
        optuna.logging.set_verbosity(verbosity)


def _guess(k: int, known: dict[int, Result], feasible: Callable[[Result], bool]) -> Result:
    """A prediction for an unmeasured ``k``: the error grows with the number of layers cast."""
    above = [j for j, r in known.items() if j > k and feasible(r)]
    if above:
        return known[min(above)]
    below = [j for j, r in known.items() if j < k and not feasible(r)]
    if below:
        return known[max(below)]
    return known[max(j for j in known if j < k)]   # k = 0 is always known
