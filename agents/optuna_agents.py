"""Thin adapters over Optuna's ask/tell: multivariate TPE and NSGA-II, constraints included.

Constraints go through ``Trial.set_constraint`` (Optuna 5 deprecated ``constraints_func`` in its
favour); TPE and NSGA-II then prefer feasible trials exactly as with ``constraints_func``.

Optuna does the searching; this module only maps the space to distributions, scores to
objective values and constraint violations (``constraints_func``), and keeps the study
somewhere resumable:

* ``storage=None``: an in-memory journal whose log (plain JSON operations, gzipped) *is* the
  agent state; ``load_state_dict`` replays it into a fresh study, identical trial for trial.
* ``storage="sqlite:///..." / "postgresql://..."``: Optuna's RDB storage, so several workers
  share one study; the state then only names the study and the asked-but-untold trials.

The sampler is rebuilt with a seed derived from (seed, trials so far) before every ask, so
proposals depend only on the history in storage, never on in-process RNG state: that is
what makes a resumed agent propose exactly what an uninterrupted one would.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from agents.base import Agent
from agents.objective import Objective, Score
from agents.optuna_space import distributions, from_policy, to_policy
from compression.policy import Policy
from compression.space import SearchSpace

SamplerKind = Literal["tpe", "nsga2"]
_CONSTRAINT_NAMES = ("latency_ms", "accuracy_drop", "size_bytes")

optuna.logging.set_verbosity(optuna.logging.WARNING)


class MemoryJournal(BaseJournalBackend):
    """Optuna journal kept as a list of JSON operations (the in-memory agent state)."""

    def __init__(self, logs: Iterable[dict[str, Any]] = ()) -> None:
        self.logs: list[dict[str, Any]] = list(logs)
        self._lock = threading.Lock()

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        with self._lock:
            return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._lock:
            self.logs.extend(logs)


class OptunaAgent(Agent):
    """Optuna ask/tell with a TPE (multivariate) or NSGA-II sampler.

    Args:
        sampler: "tpe" or "nsga2".
        storage: None for an in-memory study carried in ``state_dict``, else an RDB URL.
        study_name: shared by workers of one job (defaults to one per agent kind and seed).
        population_size: NSGA-II's generation size.
        n_startup_trials: TPE's random trials before modelling.
        warm_start: a new study starts with the rule agent's first sweep (uniform keep ratios
            per rule group, ``agents.rule``) enqueued as its first trials. In a space of ~100
            per-layer choices, 200 trials of TPE or NSGA-II from uniform samples find nothing
            near the dense accuracy; from the rule sweep they refine real trade-offs.
    """

    def __init__(
        self,
        space: SearchSpace,
        objective: Objective,
        seed: int = 0,
        *,
        sampler: SamplerKind = "tpe",
        storage: str | None = None,
        study_name: str | None = None,
        population_size: int = 20,
        n_startup_trials: int = 10,
        warm_start: bool = True,
    ) -> None:
        super().__init__(space, objective, seed)
        if sampler not in ("tpe", "nsga2"):
            raise ValueError(f"sampler must be 'tpe' or 'nsga2', got {sampler!r}")
        self.sampler_kind = sampler
        self.name = f"optuna-{sampler}"
        self.storage_url = storage
        self.study_name = study_name or f"modeltailor-{self.name}-seed{seed}"
        self.population_size = population_size
        self.n_startup_trials = n_startup_trials
        self.distributions = distributions(space)
        self._constrained = any(
            b is not None
            for b in (objective.max_latency_ms, objective.max_accuracy_drop, objective.max_size_bytes)
        )
        self.journal: MemoryJournal | None = None
        self.study = self._open(create=True)
        self.pending: dict[str, list[int]] = {}
        self._trials: dict[int, optuna.Trial] = {}
        # Workers sharing an RDB study: only the one that finds it empty seeds it.
        if warm_start and not self.study.get_trials(deepcopy=False):
            self._enqueue_rule_sweep()

    def _enqueue_rule_sweep(self) -> None:
        from agents.rule import rule_sweep

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for policy in rule_sweep(self.space, self.objective, self.seed):
                self.study.enqueue_trial(from_policy(self.space, policy), skip_if_exists=True)

    def _storage(self) -> BaseStorage:
        if self.storage_url is not None:
            return RDBStorage(self.storage_url)
        assert self.journal is not None
        return JournalStorage(self.journal)

    def _open(self, *, create: bool) -> optuna.Study:
        if self.storage_url is None and create:
            self.journal = MemoryJournal()
        directions: list[Literal["maximize", "minimize"]] = [
            "maximize" if g.direction == "max" else "minimize" for g in self.objective.goals
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.create_study(
                storage=self._storage(),
                study_name=self.study_name,
                directions=directions,
                load_if_exists=True,
            )

    def _sampler(self, n_trials: int) -> optuna.samplers.BaseSampler:
        seed = (self.seed * 1_000_003 + n_trials) % (2**31)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.sampler_kind == "nsga2":
                return optuna.samplers.NSGAIISampler(population_size=self.population_size, seed=seed)
            return optuna.samplers.TPESampler(
                multivariate=True,
                n_startup_trials=self.n_startup_trials,
                seed=seed,
                constant_liar=True,
            )

    def ask(self, n: int = 1) -> list[Policy]:
        self._check_n(n)
        out = []
        for _ in range(n):
            self.study.sampler = self._sampler(len(self.study.get_trials(deepcopy=False)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trial = self.study.ask(self.distributions)
            policy = to_policy(self.space, trial.params)
            self.pending.setdefault(policy.hash, []).append(trial.number)
            self._trials[trial.number] = trial
            out.append(policy)
        return out

    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        self._check_tell(policies, scores)
        for policy, score in zip(policies, scores, strict=True):
            numbers = self.pending.get(policy.hash)
            if not numbers:
                continue  # not asked by this agent: Optuna has no trial to attach it to
            number = numbers.pop(0)
            if not numbers:
                del self.pending[policy.hash]
            trial = self._trials.pop(number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if not score.ok:
                    self.study.tell(trial, state=TrialState.FAIL)
                    continue
                if self._constrained:
                    # Optuna's samplers read these (Trial.set_constraint replaced constraints_func in v5).
                    for key, excess in zip(_CONSTRAINT_NAMES, self.objective.violations(score), strict=True):
                        trial.set_constraint(key, excess)
                self.study.tell(trial, list(self.objective.values(score)))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "agent": self.name,
            "study_name": self.study_name,
            "pending": {h: list(v) for h, v in self.pending.items()},
        }
        if self.storage_url is not None:
            state["storage"] = self.storage_url
        else:
            assert self.journal is not None
            # The journal repeats every distribution per trial: gzip shrinks it ~20x for the JSON column.
            raw = json.dumps(self.journal.logs, separators=(",", ":")).encode()
            state["journal_gz"] = base64.b64encode(gzip.compress(raw, mtime=0)).decode()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("agent") != self.name:
            raise ValueError(f"state of agent {state.get('agent')!r} cannot restore a {self.name!r} agent")
        self.study_name = state["study_name"]
        if "journal_gz" in state:
            self.storage_url = None
            self.journal = MemoryJournal(json.loads(gzip.decompress(base64.b64decode(state["journal_gz"]))))
        else:
            self.storage_url = state["storage"]
        self.study = self._open(create=False)
        self.pending = {h: list(v) for h, v in state["pending"].items()}
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        self._trials = {
            n: optuna.Trial(self.study, by_number[n]._trial_id)
            for numbers in self.pending.values()
            for n in numbers
            if n in by_number
        }
