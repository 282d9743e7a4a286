"""Controllers: which architectures to evaluate next.

All share one small interface (archai's searcher shape, without file I/O):

    propose(history, k, rng) -> list[StudentArch]   # k new, never-evaluated archs
    update(history)                                 # learn from every observation so far
    state_dict() / load_state_dict(d)               # JSON-able, for resumable searches

``LSTMRewardController`` follows KD-NAS (Trivedi et al. 2023): an LSTM reads (previous episode's
best arch, global best arch, candidate) and predicts the candidate's reward; each episode it
scores a pool of candidates and proposes the best predicted, with epsilon-greedy exploration.
``RandomController`` and ``EvolutionController`` (regularised evolution, Real et al. 2019) are
baselines behind the same interface.
"""

from __future__ import annotations

import base64
import random
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from kdnas_core.config import ControllerConfig
from kdnas_core.search.space import SearchSpace, StudentArch
from kdnas_core.seeding import seed_torch


@dataclass
class Observation:
    """One evaluated candidate. ``context`` holds the (previous-episode best, global best) arch
    names the controller saw when it proposed this candidate (the LSTM's first two inputs)."""

    arch: StudentArch
    kd_loss: float
    latency_ms: float
    reward: float
    episode: int
    context: tuple[str | None, str | None] = (None, None)
    extra: dict = field(default_factory=dict)
    status: Literal["ok", "failed"] = "ok"
    # The reward's quality term when reward.quality is not the paper's L_HS (None: kd_loss is it).
    quality: float | None = None

    @property
    def failed(self) -> bool:
        """The candidate could not be evaluated (``extra["error"]`` says why): it is kept so the
        controller learns to avoid it, and never recommended."""
        return self.status == "failed"

    @property
    def quality_loss(self) -> float:
        """The quality term Q of the reward (lower is better): the configured signal, else L_HS."""
        return self.kd_loss if self.quality is None else self.quality

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arch"] = self.arch.name
        d["arch_id"] = self.arch.arch_id
        d["context"] = list(self.context)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Observation:
        d = dict(d)
        d.pop("arch_id", None)
        d["status"] = observation_status(d)
        d["extra"] = {k: v for k, v in d.get("extra", {}).items() if k != "status"}
        return cls(arch=StudentArch.from_name(d.pop("arch")), context=tuple(d.pop("context")), **d)


def observation_status(d: dict) -> str:
    """Status of an observation saved as a dict; states written before it had its own field
    kept it in ``extra``."""
    return d.get("status") or ("failed" if d.get("extra", {}).get("status") == "failed" else "ok")


def best_of(observations: Sequence[Observation]) -> Observation | None:
    return max(observations, key=lambda o: o.reward, default=None)


def context_for(history: Sequence[Observation]) -> tuple[str | None, str | None]:
    """(best arch of the latest finished episode, best arch overall)."""
    if not history:
        return (None, None)
    last = max(o.episode for o in history)
    prev = best_of([o for o in history if o.episode == last])
    glob = best_of(history)
    return (prev.arch.name if prev else None, glob.arch.name if glob else None)


def _unseen(space: SearchSpace, history: Sequence[Observation], rng: random.Random, n: int,
            exclude: set[str] = frozenset(), max_tries: int = 50) -> list[StudentArch]:
    """Up to ``n`` distinct random archs not evaluated yet (fewer if the space runs out)."""
    seen = {o.arch.arch_id for o in history} | set(exclude)
    out: list[StudentArch] = []
    tries = 0
    while len(out) < n and tries < max_tries * max(1, n):
        a = space.sample(rng)
        tries += 1
        if a.arch_id not in seen:
            seen.add(a.arch_id)
            out.append(a)
    return out


class Controller(Protocol):
    def propose(self, history: Sequence[Observation], k: int, rng: random.Random) -> list[StudentArch]: ...

    def update(self, history: Sequence[Observation]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# Optional abilities a controller declares by having the method (archai's objectives are the
# model): the search asks with isinstance, not hasattr.


@runtime_checkable
class FiltersProposals(Protocol):
    def set_feasible(self, feasible: Callable[[StudentArch], bool]) -> None:
        """Keep proposals to architectures for which ``feasible`` holds (e.g. predicted within budget)."""


@runtime_checkable
class PredictsRewards(Protocol):
    def predicted_rewards(self, history: Sequence[Observation], archs: Sequence[StudentArch]) -> list[float] | None:
        """The reward expected of each proposal (None until the controller has learned)."""


# Latency of an architecture as the search expects it, given what was measured so far (None
# while nothing can be predicted yet).
LatencyModel = Callable[[Sequence["Observation"]], Callable[[StudentArch], float] | None]


@runtime_checkable
class TargetsBudgets(Protocol):
    def set_budget_targets(self, budgets_ms: Sequence[float], latency: LatencyModel, near: float) -> None:
        """Propose, each episode, a candidate expected within [near x budget, budget] of every
        budget: the recommendation for a budget is the best candidate within it, and a budget
        only explored by much faster candidates loses the quality it allows."""


class _Stateless:
    """For controllers that learn nothing between episodes: nothing to update or save."""

    def update(self, history):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RandomController(_Stateless):
    """Uniform over the space; with a latency predictor (``set_feasible``), uniform over the
    archs it predicts within the loosest budget, as the learned controller's pool is, so that
    random search is the same search without the learning."""

    def __init__(self, space: SearchSpace, cfg: ControllerConfig | None = None):
        self.space = space
        self.feasible: Callable[[StudentArch], bool] | None = None

    def set_feasible(self, feasible: Callable[[StudentArch], bool]) -> None:
        self.feasible = feasible

    def propose(self, history, k, rng):
        if self.feasible is None:
            return _unseen(self.space, history, rng, k)
        pool = _unseen(self.space, history, rng, 20 * k)
        ok = [a for a in pool if self.feasible(a)]
        return (ok + [a for a in pool if a not in ok])[:k]  # too few feasible: fill up with the rest


class EvolutionController(_Stateless):
    """Regularised (ageing) evolution: tournament-select a parent among the most recent
    ``population`` observations, propose a mutated child; random until the population fills."""

    def __init__(self, space: SearchSpace, cfg: ControllerConfig):
        self.space, self.cfg = space, cfg

    def propose(self, history, k, rng):
        population = list(history)[-self.cfg.population:]
        if len(population) < self.cfg.tournament:
            return _unseen(self.space, history, rng, k)
        seen = {o.arch.arch_id for o in history}
        out: list[StudentArch] = []
        for _ in range(50 * k):
            if len(out) == k:
                break
            parent = best_of(rng.sample(population, self.cfg.tournament))
            child = self.space.mutate(parent.arch, rng)
            if child.arch_id not in seen:
                seen.add(child.arch_id)
                out.append(child)
        return out + _unseen(self.space, history, rng, k - len(out), exclude={a.arch_id for a in out})


class ArchEncoder:
    """One-hot per field over the space's choices (plus an all-zero 'none' for missing context)."""

    FIELDS = ("layers", "hidden", "heads", "ffn", "activation")

    def __init__(self, space: SearchSpace):
        self.choices = {f: list(getattr(space, f)) for f in self.FIELDS}
        self.dim = sum(len(c) for c in self.choices.values())

    def __call__(self, arch: StudentArch | None) -> torch.Tensor:
        v = torch.zeros(self.dim)
        if arch is None:
            return v
        offset = 0
        for f in self.FIELDS:
            choices = self.choices[f]
            value = getattr(arch, f)
            if value in choices:
                v[offset + choices.index(value)] = 1.0
            offset += len(choices)
        return v


class RewardLSTM(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:  # [B, 3, in_dim] -> [B]
        out, _ = self.lstm(seq)
        return self.head(out[:, -1]).squeeze(-1)


class LSTMRewardController:
    """KD-NAS's reward-predicting LSTM controller.

    From the paper: the LSTM reads (previous episode's best, global best, candidate) and
    predicts the candidate's reward; it is trained with MSE on every observed reward; each
    episode scores a pool and proposes the top-k with epsilon-greedy exploration (epsilon from
    1.0 down by 0.05 per episode to 0.05); RMSprop, lr 1e-4.

    Our choices (not specified by the paper): one-hot field encoding; rewards standardised to
    zero mean and unit variance before fitting (the LSTM then learns the ranking, whatever the
    reward's scale); ``train_epochs`` full-batch passes per update; half of the pool drawn as
    mutations of the best archs found so far, so a late episode refines what works instead of
    scoring only random archs; a seeded torch generator so that searches are reproducible.
    """

    def __init__(self, space: SearchSpace, cfg: ControllerConfig, seed: int = 0):
        self.space, self.cfg = space, cfg
        # Optional cheap pre-filter (e.g. predicted latency within the loosest budget): pool
        # candidates failing it are only scored when too few pass.
        self.feasible: Callable[[StudentArch], bool] | None = None
        self.budget_targets: tuple[list[float], LatencyModel, float] | None = None
        self.encode = ArchEncoder(space)
        seed_torch(seed)
        self.model = RewardLSTM(self.encode.dim, cfg.lstm_hidden)
        self.opt = torch.optim.RMSprop(self.model.parameters(), lr=cfg.lr)
        self.updates = 0
        # Rewards are standardised for fitting; these map predictions back to reward units.
        self.reward_mean, self.reward_std = 0.0, 1.0

    def epsilon(self, episode: int) -> float:
        return max(self.cfg.epsilon_min, self.cfg.epsilon_start - self.cfg.epsilon_decay * episode)

    def _inputs(self, context: tuple[str | None, str | None], archs: Sequence[StudentArch]) -> torch.Tensor:
        prev, glob = (StudentArch.from_name(c) if c else None for c in context)
        head = torch.stack([self.encode(prev), self.encode(glob)])
        return torch.stack([torch.cat([head, self.encode(a)[None]]) for a in archs])

    @torch.no_grad()
    def predict(self, context: tuple[str | None, str | None], archs: Sequence[StudentArch]) -> list[float]:
        if not archs:
            return []
        self.model.eval()
        return self.model(self._inputs(context, archs)).tolist()

    def _pool(self, history: Sequence[Observation], rng: random.Random) -> list[StudentArch]:
        seen = {o.arch.arch_id for o in history}
        pool: list[StudentArch] = []
        top = sorted(history, key=lambda o: -o.reward)[: self.cfg.elite]
        for _ in range(self.cfg.pool_size * 5):
            if len(pool) >= self.cfg.pool_size // 2 or not top:
                break
            child = self.space.mutate(rng.choice(top).arch, rng)
            if child.arch_id not in seen:
                seen.add(child.arch_id)
                pool.append(child)
        pool += _unseen(self.space, history, rng, self.cfg.pool_size - len(pool), exclude=seen)
        if self.feasible is not None:
            ok = [a for a in pool if self.feasible(a)]
            pool = ok + [a for a in pool if a not in ok][: max(0, self.cfg.pool_size // 4 - len(ok))]
        return pool

    def propose(self, history, k, rng):
        episode = max((o.episode for o in history), default=-1) + 1
        pool = self._pool(history, rng)
        n_greedy = round((1 - self.epsilon(episode)) * k) if history and self.updates else 0
        scores = self.predict(context_for(history), pool)
        ranked = [a for _, a in sorted(zip(scores, pool), key=lambda t: -t[0])]
        greedy = ranked[:n_greedy]
        rest = [a for a in pool if a not in greedy]
        return self._near_budgets(greedy + rng.sample(rest, min(k - len(greedy), len(rest))), ranked, history)

    def _near_budgets(self, picked: list[StudentArch], ranked: list[StudentArch],
                      history: Sequence[Observation]) -> list[StudentArch]:
        """For each budget no proposal is expected near, the best-ranked pool candidate that is
        takes the place of an exploration pick (the last ones; greedy picks go last)."""
        if self.budget_targets is None:
            return picked
        budgets, latency_model, near = self.budget_targets
        latency = latency_model(history)
        if latency is None:
            return picked
        expected = {a.arch_id: latency(a) for a in {*picked, *ranked}}
        picked, kept = list(picked), set()
        for b in sorted(budgets):
            def in_band(a: StudentArch, b: float = b) -> bool:
                # 5 % short of the budget: a predicted latency is only an estimate.
                return near * b <= expected[a.arch_id] <= 0.95 * b

            hit = next((i for i, a in enumerate(picked) if in_band(a) and i not in kept), None)
            if hit is None:
                candidate = next((a for a in ranked if in_band(a) and a not in picked), None)
                hit = next((i for i in reversed(range(len(picked))) if i not in kept), None)
                if candidate is None or hit is None:
                    continue
                picked[hit] = candidate
            kept.add(hit)
        return picked

    def set_budget_targets(self, budgets_ms: Sequence[float], latency: LatencyModel, near: float) -> None:
        self.budget_targets = (list(budgets_ms), latency, near)

    def update(self, history):
        if len(history) < 2:
            return
        x = torch.cat([self._inputs(o.context, [o.arch]) for o in history])
        y = torch.tensor([o.reward for o in history], dtype=torch.float32)
        self.reward_mean, self.reward_std = float(y.mean()), float(y.std().clamp_min(1e-8))
        y = (y - self.reward_mean) / self.reward_std
        self.model.train()
        for _ in range(self.cfg.train_epochs):
            self.opt.zero_grad()
            loss = nn.functional.mse_loss(self.model(x), y)
            loss.backward()
            self.opt.step()
        self.updates += 1

    def state_dict(self) -> dict:
        # Weights and optimiser moments as safetensors bytes (base64 inside the JSON state):
        # reading a state back never unpickles anything.
        tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        for i, st in self.opt.state_dict()["state"].items():
            for name, value in st.items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).clone().contiguous()
        blob = save_safetensors(tensors)
        return {"weights": base64.b64encode(blob).decode(), "updates": self.updates,
                "reward_mean": self.reward_mean, "reward_std": self.reward_std}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        tensors = load_safetensors(base64.b64decode(state["weights"]))
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        own = self.model.state_dict()
        if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(v.shape) for k, v in own.items()}:
            # A warm start from a search over other choices (a config edit, or a search made
            # before a cap): its weights encode other one-hot positions. The controller learns
            # again from the known results instead.
            warnings.warn("the controller's saved weights were trained on another search space; "
                          "it starts fresh and learns from the known results")
            return
        self.model.load_state_dict(weights)
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = value
        full = self.opt.state_dict()
        full["state"] = opt_state
        self.opt.load_state_dict(full)
        self.updates = state.get("updates", 0)
        self.reward_mean, self.reward_std = state.get("reward_mean", 0.0), state.get("reward_std", 1.0)

    def set_feasible(self, feasible: Callable[[StudentArch], bool]) -> None:
        self.feasible = feasible

    def predicted_rewards(self, history: Sequence[Observation], archs: Sequence[StudentArch]) -> list[float] | None:
        """What the controller expects each proposal to score, in reward units (None before it
        has learned anything): logged next to the actual reward."""
        if not self.updates:
            return None
        return [z * self.reward_std + self.reward_mean for z in self.predict(context_for(history), archs)]


CONTROLLERS = {"lstm": LSTMRewardController, "random": RandomController, "evolution": EvolutionController}


def make_controller(space: SearchSpace, cfg: ControllerConfig, seed: int = 0) -> Controller:
    if cfg.kind == "lstm":
        return LSTMRewardController(space, cfg, seed)
    return CONTROLLERS[cfg.kind](space, cfg)
