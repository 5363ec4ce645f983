"""Search strategies over a finite candidate list.

An objective maps a meta choice to seconds, or None when the candidate failed (did not
compile, crashed, gave wrong numbers); exceptions it raises propagate.  Every strategy calls
the objective at most once per distinct candidate (repeats are answered from a cache) and
never on anything outside the list.  Strategies:

* ``exhaustive``: every candidate, in list order (``budget`` and ``seed`` are ignored);
* ``random``: ``budget`` distinct candidates drawn with ``random.Random(seed)``;
* ``tpe``: Optuna's TPE sampler (multivariate) with one parameter per meta key, whose
  choices are the values that key takes in the candidate list.  Keys with numeric values
  (block sizes, warps, stages) are sampled as the integer *index* into their sorted values,
  so TPE can exploit that 64 lies between 32 and 128; other keys are categorical.
  ``ordinal=False`` makes every key a plain categorical: on five cost-model GEMM tables of
  ~1,200 candidates at a 4% budget (10 seeds each) that raised the mean regret from 0.24%
  to 1.7%.  A proposed combination that is not in the list (pruned) is never evaluated: it
  is told to the sampler as infeasible (an Optuna constraint violation), so TPE learns to
  avoid it, and the next trial is redirected to the nearest unevaluated candidate (L1
  distance over those indices), as is a proposal of an already-evaluated candidate; so the
  whole ``budget`` is spent on distinct candidates.  Seed-deterministic; Optuna's logging
  and its experimental/deprecation warnings are silenced while it runs.

``budget`` counts objective calls (distinct candidates evaluated); None means all of them.
"""
from __future__ import annotations

import math
import random as _random
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

Objective = Callable[[dict], "float | None"]


@dataclass
class SearchResult:
    best_meta: dict | None          # None when every evaluation failed
    best_seconds: float | None
    trials: list[tuple[dict, float | None, str]]  # one per objective call, in call order; status "ok" | "failed"
    strategy: str = ""
    skipped: int = 0                # proposals not evaluated (TPE: pruned combinations and repeats)

    @property
    def evaluations(self) -> int:
        return len(self.trials)


def _freeze(v):
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def meta_key(meta: dict) -> tuple:
    """A hashable key of a meta choice (sorted items), for caches and recorded timing tables."""
    return tuple(sorted((k, _freeze(v)) for k, v in meta.items()))


def _dedupe(candidates: Sequence[dict]) -> list[dict]:
    seen, out = set(), []
    for meta in candidates:
        if not isinstance(meta, dict):
            raise TypeError(f"a candidate must be a dict of meta-parameters, got {meta!r}")
        k = meta_key(meta)
        if k not in seen:
            seen.add(k)
            out.append(meta)
    if not out:
        raise ValueError("no candidates to search (everything was pruned?)")
    return out


def _budget(budget: int | None, n: int) -> int:
    if budget is None:
        return n
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int or None, got {budget!r}")
    return min(budget, n)


class _Evaluator:
    """Calls the objective once per candidate index and keeps the trial log and the best."""

    def __init__(self, candidates: list[dict], objective: Objective, strategy: str):
        self.candidates, self.objective, self.strategy = candidates, objective, strategy
        self.cache: dict[int, float | None] = {}
        self.trials: list[tuple[dict, float | None, str]] = []
        self.best: int | None = None
        self.skipped = 0

    def __call__(self, i: int) -> float | None:
        if i in self.cache:
            return self.cache[i]
        meta = self.candidates[i]
        value = self.objective(dict(meta))
        if value is not None:
            value = float(value)
            if not math.isfinite(value):
                value = None
        self.cache[i] = value
        self.trials.append((dict(meta), value, "failed" if value is None else "ok"))
        if value is not None and (self.best is None or value < self.cache[self.best]):
            self.best = i
        return value

    def result(self) -> SearchResult:
        if self.best is None:
            return SearchResult(None, None, self.trials, self.strategy, self.skipped)
        return SearchResult(dict(self.candidates[self.best]), self.cache[self.best], self.trials,
                            self.strategy, self.skipped)


def exhaustive(candidates: Sequence[dict], objective: Objective, budget: int | None = None,
               seed: int = 0) -> SearchResult:
    """Every distinct candidate in order; ties go to the earlier one."""
    cands = _dedupe(candidates)
    ev = _Evaluator(cands, objective, "exhaustive")
    for i in range(len(cands)):
        ev(i)
    return ev.result()


def random(candidates: Sequence[dict], objective: Objective, budget: int | None = None,
           seed: int = 0) -> SearchResult:
    """``budget`` distinct candidates, drawn uniformly without replacement."""
    cands = _dedupe(candidates)
    n = _budget(budget, len(cands))
    ev = _Evaluator(cands, objective, "random")
    for i in _random.Random(seed).sample(range(len(cands)), n):
        ev(i)
    return ev.result()


def _choices(cands: list[dict]) -> tuple[list[str], dict[str, list]]:
    keys = list(cands[0])
    for meta in cands:
        if set(meta) != set(keys):
            raise ValueError(f"candidates have different meta keys: {sorted(keys)} vs {sorted(meta)}")
    choices: dict[str, list] = {}
    for k in keys:
        vals, seen = [], set()
        for meta in cands:
            f = _freeze(meta[k])
            if f not in seen:
                seen.add(f)
                vals.append(meta[k])
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            vals.sort()  # numeric values are ordinal: distance between 32 and 64 is 1 step
        choices[k] = vals
    return keys, choices


def tpe(candidates: Sequence[dict], objective: Objective, budget: int | None = None, seed: int = 0,
        n_startup_trials: int | None = None, multivariate: bool = True, ordinal: bool = True,
        **sampler_options) -> SearchResult:
    """Optuna TPE over the candidates' meta keys (see the module docstring).

    ``n_startup_trials`` (random trials before TPE models anything) defaults to
    ``min(10, max(3, budget // 8))``; ``sampler_options`` go to ``optuna.samplers.TPESampler``."""
    cands = _dedupe(candidates)
    n = _budget(budget, len(cands))
    ev = _Evaluator(cands, objective, "tpe")
    if n >= len(cands):  # nothing to choose: every candidate is measured anyway
        for i in range(len(cands)):
            ev(i)
        return ev.result()

    try:
        import optuna  # only this strategy needs it
    except ImportError as e:
        raise ImportError("the tpe search strategy needs optuna (pip install optuna)") from e

    keys, choices = _choices(cands)
    index = {k: {_freeze(v): j for j, v in enumerate(vals)} for k, vals in choices.items()}
    coords = [tuple(index[k][_freeze(meta[k])] for k in keys) for meta in cands]
    position = {c: i for i, c in enumerate(coords)}
    ranges = {k: list(range(len(choices[k]))) for k in keys}
    numeric = {k: all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in choices[k]) for k in keys}

    def suggest(trial, k):
        if ordinal and numeric[k] and len(ranges[k]) > 1:
            return trial.suggest_int(k, 0, len(ranges[k]) - 1)
        return trial.suggest_categorical(k, ranges[k])

    def nearest_unevaluated(c: tuple) -> int | None:
        best, best_d = None, None
        for i, ci in enumerate(coords):
            if i in ev.cache:
                continue
            d = sum(abs(a - b) for a, b in zip(c, ci))
            if best_d is None or d < best_d:
                best, best_d = i, d
        return best

    # Optuna >= 5 reads constraints set on the trial; older releases need constraints_func.
    per_trial_constraints = hasattr(optuna.trial.Trial, "set_constraint")

    def violation(frozen) -> tuple[float]:
        return (float(frozen.user_attrs.get("violation", 0.0)),)

    startup = n_startup_trials if n_startup_trials is not None else min(10, max(3, n // 8))
    old_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna\.")
            extra = {} if per_trial_constraints else {"constraints_func": violation}
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=multivariate,
                                                 **extra, **sampler_options)
            study = optuna.create_study(direction="minimize", sampler=sampler)
            worst = 1.0
            max_asks = 4 * n + 100  # each ask evaluates, or redirects the next one to an evaluation
            asks = 0
            while len(ev.cache) < n and asks < max_asks:
                asks += 1
                trial = study.ask()
                c = tuple(suggest(trial, k) for k in keys)
                i = position.get(c)
                if i is not None and i not in ev.cache:
                    value = ev(i)
                else:
                    ev.skipped += 1
                    value = None if i is None else ev.cache[i]
                    target = nearest_unevaluated(c)
                    if target is not None:
                        study.enqueue_trial({k: coords[target][j] for j, k in enumerate(keys)})
                if value is None:  # pruned combination or failed candidate: infeasible for TPE
                    if per_trial_constraints:
                        trial.set_constraint("runnable", 1.0)
                    else:
                        trial.set_user_attr("violation", 1.0)
                    study.tell(trial, worst)
                else:
                    worst = max(worst, value)
                    study.tell(trial, value)
    finally:
        optuna.logging.set_verbosity(old_verbosity)
    return ev.result()


STRATEGIES: dict[str, Callable[..., SearchResult]] = {"exhaustive": exhaustive, "random": random, "tpe": tpe}


def search(strategy: str | Callable[..., SearchResult], candidates: Sequence[dict], objective: Objective,
           budget: int | None = None, seed: int = 0, **options) -> SearchResult:
    """Run ``strategy`` (a name in ``STRATEGIES`` or a function with the same signature)."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown search strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        strategy = STRATEGIES[strategy]
    return strategy(candidates, objective, budget=budget, seed=seed, **options)
