"""Loss weightings for multi-task learning: how the per-task losses of a step combine into what is trained.

``WEIGHTINGS`` maps a name to its class; a new weighting is one class and one line there. A class declares the
options it reads with their defaults (``defaults``). Each is an ``nn.Module`` so learned weights (``uncertainty``)
are parameters the training loop's optimizer trains when the module is part of the trained unit.

``combine(losses)`` is the scalar to backpropagate; ``losses`` may hold only the tasks a sampler picked this step
(``sora.train.samplers``), and missing tasks simply add nothing. ``backward`` is where a method that changes the
gradients rather than the loss (PCGrad) does its work; the others backpropagate ``combine``. Sums are float32 even
when the losses come from bf16 autocast.

PCGrad rather than GradNorm as the gradient-based method: PCGrad has no hyperparameter to tune and no extra
learned weights, works with any number of tasks per step (a sampler may pick 2 of 5), and needs only the
per-task gradients of the shared parameters; GradNorm needs a choice of the shared layer whose gradient norms
it balances, an asymmetry α, and its own weights with their own learning rate.
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sora.errors import ConfigError


class LossWeighting(nn.Module):
    """Σ_t w_t L_t over the tasks in ``losses``; subclasses say what w_t is (``coefficient``) or override it all.

    ``tasks``: task name -> the recipe's fixed weight α_t (finite, ≥ 0)."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # the options the weighting reads, with their defaults
    # True where ``backward`` does more than backpropagate ``combine`` (the loop then calls it instead).
    manual_backward: ClassVar[bool] = False
    lr: float | None = None  # the learning rate of the weighting's own parameters (None: the loop's)

    def __init__(self, tasks: dict[str, float], **options: Any):
        super().__init__()
        unread = sorted(set(options) - set(self.defaults))
        if unread:
            takes = ", ".join(self.defaults) or "no options"
            raise ConfigError(f"loss weighting option {unread[0]!r}: {self.name} does not take it (it takes {takes})")
        if not tasks:
            raise ConfigError("loss weighting: no tasks")
        bad = {t: a for t, a in tasks.items()
               if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0}
        if bad:
            raise ConfigError(f"loss weighting: task weights must be finite numbers >= 0, got {bad}")
        self.tasks = {t: float(a) for t, a in tasks.items()}
        self.options: dict[str, Any] = {**self.defaults, **options}
        for key, value in self.options.items():
            setattr(self, key, value)

    def at_step(self, step: int, micro: int) -> None:
        """Called by the loop before each micro-batch's backward (``step``: the optimizer step)."""

    def coefficient(self, task: str) -> float | Tensor:
        """w_t, the factor on task ``task``'s loss."""
        raise NotImplementedError

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        """The scalar to backpropagate (float32), over the tasks present in ``losses``."""
        self._check(losses)
        terms = [self.coefficient(t) * loss.float() for t, loss in losses.items()]
        return torch.stack(terms).sum()

    def weights(self) -> dict[str, float]:
        """The current effective weight of every task, for the training log (``weight/{task}``)."""
        return {t: float(self.coefficient(t)) for t in self.tasks}

    def backward(self, losses: dict[str, Tensor], shared: list[nn.Parameter], scale: float = 1.0) -> Tensor:
        """Backpropagate ``combine(losses) * scale`` (``scale``: e.g. 1 / grad_accum, or the fp16 loss scale),
        accumulating into ``.grad`` as ``Tensor.backward`` does; returns that scaled loss, detached, for logging.
        ``shared``: the parameters every task trains (the encoder); only gradient methods read it."""
        loss = self.combine(losses) * scale
        loss.backward()
        return loss.detach()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {"tasks": self.tasks, **self.options}.items())

    def _check(self, losses: dict[str, Tensor]) -> None:
        if not losses:
            raise ValueError("no task losses to combine")
        unknown = [t for t in losses if t not in self.tasks]
        if unknown:
            raise ValueError(f"loss for unknown task {unknown[0]!r} (this weighting has {', '.join(self.tasks)})")


class Fixed(LossWeighting):
    """Σ α_t L_t with the recipe's weights."""

    name = "fixed"

    def coefficient(self, task):
        return self.tasks[task]


class Equal(LossWeighting):
    """Σ L_t: every task weighs 1, whatever the recipe says."""

    name = "equal"

    def coefficient(self, task):
        return 1.0


class Uncertainty(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018): a learned log-variance s_t per task
    (initialised to 0), L = Σ_t exp(-s_t)·L_t + s_t, so the weight of task t is exp(-s_t).

    This is exactly twice Kendall's regression form ½·exp(-s)·L + ½·s (hence the same optimum, s_t = log L_t:
    each task weighted by the inverse of its loss, noisier tasks down-weighted) and the same form for every kind of
    task, where the paper's classification form (exp(-s)·L + ½·s) would need to know which loss is which; it is
    the form common implementations use. The recipe's α_t are not used: learning the weights is the point.

    s_t is one float32 vector parameter (1-D, so the loop's AdamW gives it no weight decay); as the loss of a task
    goes to 0 its weight grows without bound, so it suits losses with a floor (noise, regularisation). It learns at
    its own rate, ``lr`` (0.01): at fine-tuning's 2e-4 it would move by about 0.06 over a 300-step run, i.e. not
    at all."""

    name = "uncertainty"
    defaults: ClassVar[dict[str, Any]] = {"lr": 0.01}

    def __init__(self, tasks: dict[str, float], **options: Any):
        super().__init__(tasks, **options)
        lr = self.lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
                               or lr <= 0):
            raise ConfigError(f"loss weighting option 'lr' must be a finite number > 0 (or null), got {lr!r}")
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def coefficient(self, task):
        return torch.exp(-self.log_vars[self.index[task]])

    def combine(self, losses):
        self._check(losses)
        s = self.log_vars[[self.index[t] for t in losses]].float()
        stacked = torch.stack([loss.float().to(s.device) for loss in losses.values()])
        return (torch.exp(-s) * stacked + s).sum()

    @torch.no_grad()
    def weights(self):
        return {t: float(torch.exp(-self.log_vars[i])) for t, i in self.index.items()}


class PCGrad(Fixed):
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning") on the recipe-weighted losses α_t L_t.

    For the ``shared`` parameters, each task's gradient g_i is projected, in a random order of the other tasks,
    off every g_j it conflicts with (g_i·g_j < 0): g_i ← g_i - (g_i·g_j)/|g_j|² g_j; the projected gradients are
    summed. Every other parameter the losses reach (task heads) gets the plain gradient of Σ α_t L_t. Both are
    added to ``.grad`` (micro-batches accumulate). A parameter a task's loss does not reach counts as a zero
    gradient for that task. With one task this is plain backward.

    The order is seeded by (``seed``, ``step``, ``micro``): the loop sets ``step`` (the optimizer step) and
    ``micro`` (the micro-batch within it) before each call, so a resumed run projects as the uninterrupted one did.

    Cost: one backward pass per task (the graph is retained between them) and 2 × tasks float32 copies of the
    shared gradient. Gradients are computed with ``torch.autograd.grad`` and written into ``.grad`` directly, so
    parameter hooks do not fire: under DistributedDataParallel the loop must average ``.grad`` itself."""

    name = "pcgrad"
    defaults: ClassVar[dict[str, Any]] = {"seed": 0}
    manual_backward = True

    def __init__(self, tasks: dict[str, float], **options: Any):
        super().__init__(tasks, **options)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"loss weighting option 'seed' must be an integer, got {self.seed!r}")
        self.step = 0
        self.micro = 0

    def at_step(self, step, micro):
        self.step, self.micro = step, micro

    def backward(self, losses, shared, scale=1.0):
        self._check(losses)
        if len(losses) < 2:
            return super().backward(losses, shared, scale)
        terms = [self.tasks[t] * loss.float() * scale for t, loss in losses.items()]
        total = torch.stack([term.detach() for term in terms]).sum()
        params = list({id(p): p for p in shared if p.requires_grad}.values())
        ids = {id(p) for p in params}
        heads = [v for v in _leaves(terms) if id(v) not in ids]
        inputs = params + heads
        live = [i for i, term in enumerate(terms) if term.requires_grad]
        if not inputs or not live:
            return total

        sizes = [p.numel() for p in params]
        flat = torch.zeros(len(terms), sum(sizes), dtype=torch.float32, device=total.device)
        reached = [False] * len(params)
        head_grads: list[Tensor | None] = [None] * len(heads)
        for n, i in enumerate(live):
            grads = torch.autograd.grad(terms[i], inputs, retain_graph=n < len(live) - 1, allow_unused=True)
            offset = 0
            for k, (g, size) in enumerate(zip(grads[:len(params)], sizes, strict=True)):
                if g is not None:
                    flat[i, offset:offset + size] = g.reshape(-1).float()
                    reached[k] = True
                offset += size
            for k, g in enumerate(grads[len(params):]):
                if g is not None:
                    head_grads[k] = g if head_grads[k] is None else head_grads[k] + g

        projected = self.project(flat)
        offset = 0
        for p, size, hit in zip(params, sizes, reached, strict=True):
            if hit:
                _accumulate(p, projected[offset:offset + size].view_as(p))
            offset += size
        for v, g in zip(heads, head_grads, strict=True):
            if g is not None:
                _accumulate(v, g)
        return total

    def project(self, grads: Tensor) -> Tensor:
        """The sum over tasks of each row of ``grads`` (tasks × shared size) projected off the conflicting rows."""
        rng = random.Random(f"pcgrad:{self.seed}:{self.step}:{self.micro}")  # str seeds hash the same everywhere
        out = grads.clone()
        squares = (grads * grads).sum(1).clamp(min=1e-20)
        n = len(grads)
        for i in range(n):
            others = [j for j in range(n) if j != i]
            rng.shuffle(others)
            for j in others:
                dot = (out[i] * grads[j]).sum()
                out[i] -= dot.clamp(max=0) / squares[j] * grads[j]  # no branch: no device sync per pair
        return out.sum(0)


def _leaves(tensors: list[Tensor]) -> list[Tensor]:
    """The leaf tensors (parameters) requiring grad that ``tensors``' graphs reach, in a deterministic order:
    the ``variable`` of each ``AccumulateGrad`` node, found by walking ``grad_fn`` back."""
    found: dict[int, Tensor] = {}
    seen: set[Any] = set()
    stack = [t.grad_fn for t in reversed(tensors) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(next_fn for next_fn, _ in reversed(fn.next_functions))
    return list(found.values())


def _accumulate(p: Tensor, g: Tensor) -> None:
    """``p.grad += g``, as ``Tensor.backward`` accumulates (creating it when there is none)."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad.add_(g)


WEIGHTINGS: dict[str, type[LossWeighting]] = {cls.name: cls for cls in (Fixed, Equal, Uncertainty, PCGrad)}


def build_weighting(name: str, tasks: dict[str, float], **options: Any) -> LossWeighting:
    """The weighting ``name`` (see ``WEIGHTINGS``); an unknown name or option is a ``ConfigError`` saying what
    exists."""
    try:
        cls = WEIGHTINGS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss weighting {name!r} (known: {', '.join(sorted(WEIGHTINGS))})") from None
    return cls(tasks, **options)


__all__ = ["WEIGHTINGS", "Equal", "Fixed", "LossWeighting", "PCGrad", "Uncertainty", "build_weighting"]
