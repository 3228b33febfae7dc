"""Adversarial training objectives (L_AT): each wraps a task objective, ``loss = wrapper(model, batch)``, so it
adds up with multi-task training and the auxiliary denoising loss like any other objective (``TrainUnit``).

The perturbation δ is added to the word embeddings' output at real tokens, never to padding, through the model's
one seam, ``SoraModel.perturbed``: one δ per encoder pass the wrapped objective makes — made on first use, so it
has that pass's shape (B, T, dim) whatever the task kind (a siamese pair makes two passes, each text with its
own δ and its own ε-ball; QA and relation one) and whatever ``Unpad`` does inside the encoder afterwards. Norms
are per example (per row of a pass) over its real tokens.

``ADVERSARIAL`` maps a recipe's ``adversarial.method`` to its class: a new method is one class and one line there.
A class declares the settings it reads with their defaults (``defaults``; ``config.AdversarialConfig`` documents
them) and its cost per training step in passes through the wrapped objective (``forwards``, ``backwards``, where
plain training makes 1 and 1; a backward pass to δ only counts as one). Outside training (validation runs in eval
mode under ``torch.no_grad``) a wrapper is its objective, so validation losses compare with plain fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from sora.config import AdversarialConfig
from sora.errors import ConfigError
from sora.models.autoencoder import SoraModel

Batch = dict[str, torch.Tensor]
Init = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (word embeddings (B, T, dim), mask (B, T)) -> δ


class Perturbation:
    """The δ of each encoder pass of one evaluation of the wrapped objective: given (``deltas``), or made by
    ``init(words, mask)`` (zeros without one) when a pass has none yet. Each is a float32 leaf, zero at padding,
    that requires grad when the ascent needs its gradient."""

    def __init__(self, init: Init | None = None, deltas: list[torch.Tensor] | None = None, grad: bool = True):
        self.init, self.grad = init, grad
        self.deltas = [d.detach().requires_grad_(grad) for d in deltas or []]

    def __call__(self, i: int, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if i == len(self.deltas):
            d = self.init(words, mask) if self.init is not None else torch.zeros_like(words, dtype=torch.float32)
            self.deltas.append((d.float() * mask.unsqueeze(-1)).detach().requires_grad_(self.grad))
        return self.deltas[i]


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row (example) over all its other dimensions, shaped to broadcast against ``x``."""
    return x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))


def unit(g: torch.Tensor) -> torch.Tensor:
    """Each row scaled to L2 norm 1 (a zero row stays zero)."""
    return g / row_norms(g).clamp(min=1e-12)


def project(d: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each row brought back into the L2 ball of radius ``epsilon`` (0: unbounded)."""
    if epsilon <= 0:
        return d
    return d * (epsilon / row_norms(d).clamp(min=epsilon))


def gradients(loss: torch.Tensor, p: Perturbation, retain: bool) -> list[torch.Tensor]:
    """d loss / d δ for each pass (zeros where the loss does not depend on it); parameters get nothing."""
    if not p.deltas:
        return []
    grads = torch.autograd.grad(loss, p.deltas, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(d) if g is None else g for d, g in zip(p.deltas, grads, strict=True)]


class Adversarial(nn.Module):
    """A wrapped objective trained on perturbed inputs; subclasses give ``adversarial_loss``."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]  # the settings the method reads, with their defaults
    makes_examples: ClassVar[bool] = False  # trains on attacked copies of the data (fine-tuning makes them)

    def __init__(self, objective: nn.Module, **settings: Any):
        super().__init__()
        unread = sorted(set(settings) - set(self.defaults))
        if unread:
            raise ConfigError(f"adversarial.{unread[0]}: {self.name} does not read it "
                              f"(it reads {', '.join(self.defaults)})")
        self.objective = objective
        self.settings: dict[str, Any] = {**self.defaults, **settings}
        for key, value in self.settings.items():
            setattr(self, key, value)
        self.last_deltas: list[torch.Tensor] = []  # the last training step's final perturbation, one per pass

    # Cost per training step, in passes through the wrapped objective (plain training: 1 forward, 1 backward).
    @property
    def forwards(self) -> int:
        raise NotImplementedError

    @property
    def backwards(self) -> int:
        raise NotImplementedError

    @property
    def last_norm(self) -> float:
        """Mean per-example L2 norm of the last perturbation (over the rows of every pass)."""
        norms = [d.flatten(1).norm(dim=1) for d in self.last_deltas]
        return float(torch.cat(norms).mean()) if norms else 0.0

    def forward(self, model: SoraModel, batch: Batch) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.objective(model, batch)  # validation: the clean loss
        loss, deltas = self.adversarial_loss(model, batch)
        self.last_deltas = [d.detach() for d in deltas]
        return loss

    def adversarial_loss(self, model: SoraModel, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the loss to backpropagate, the final perturbation of each encoder pass)."""
        raise NotImplementedError

    def perturbed(self, model: SoraModel, batch: Batch, p: Perturbation) -> torch.Tensor:
        """The wrapped objective's loss with ``p`` added to the word embeddings."""
        with model.perturbed(p):
            return self.objective(model, batch)


class FGM(Adversarial):
    """Fast gradient method (Miyato et al. 2017): one step of size ε along the loss gradient at the clean
    input, L2-normalised per example; loss = clean + adversarial."""

    name = "fgm"
    defaults: ClassVar[dict[str, float]] = {"epsilon": 1.0}
    forwards, backwards = 2, 3  # clean, adversarial; to δ, then the parameters through both graphs

    def adversarial_loss(self, model, batch):
        at_zero = Perturbation()  # δ = 0: the clean loss, and its gradient with respect to the embeddings
        clean = self.perturbed(model, batch, at_zero)
        step = Perturbation(deltas=[self.epsilon * unit(g) for g in gradients(clean, at_zero, retain=True)],
                            grad=False)
        return clean + self.perturbed(model, batch, step), step.deltas


class PGD(Adversarial):
    """Projected gradient descent (Madry et al. 2018) in the per-example L2 ball of radius ε: a random start
    in the ball, ``steps`` ascent steps of size ``adv_lr`` along the normalised gradient, each projected back;
    loss = clean + adversarial at the last point."""

    name = "pgd"
    defaults: ClassVar[dict[str, float]] = {"epsilon": 1.0, "steps": 3, "adv_lr": 0.3}

    @property
    def forwards(self) -> int:
        return self.steps + 2  # clean, one per step, the last point

    @property
    def backwards(self) -> int:
        return self.steps + 2  # to δ per step, then the parameters through the clean and last graphs

    def start(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A random direction over the real tokens, at a radius uniform in [0, ε]."""
        z = torch.randn_like(words, dtype=torch.float32) * mask.unsqueeze(-1)
        return unit(z) * self.epsilon * torch.rand(len(words), 1, 1, device=words.device)

    def adversarial_loss(self, model, batch):
        clean = self.objective(model, batch)
        p = Perturbation(self.start)
        for _ in range(self.steps):
            grads = gradients(self.perturbed(model, batch, p), p, retain=False)
            p = Perturbation(deltas=[project(d + self.adv_lr * unit(g), self.epsilon)
                                     for d, g in zip(p.deltas, grads, strict=True)])
        last = Perturbation(deltas=p.deltas, grad=False)
        return clean + self.perturbed(model, batch, last), last.deltas


class FreeLB(Adversarial):
    """FreeLB (Zhu et al. 2020): ``steps`` ascent steps from a uniform start scaled by init_mag/√(L·d) (L real
    tokens, d the width), each of size ``adv_lr`` along the per-example normalised gradient (projected into the
    ``epsilon`` ball when > 0); the parameter gradient is the average over the steps of the gradient at each
    step's perturbation."""

    name = "freelb"
    defaults: ClassVar[dict[str, float]] = {"steps": 2, "adv_lr": 0.1, "init_mag": 0.6, "epsilon": 0.0}

    @property
    def forwards(self) -> int:
        return self.steps

    @property
    def backwards(self) -> int:
        return 2 * self.steps - 1  # to δ after every step but the last, and the parameters through every graph

    def start(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dims = mask.sum(1).clamp(min=1).float() * words.shape[-1]
        u = torch.empty_like(words, dtype=torch.float32).uniform_(-1, 1) * mask.unsqueeze(-1)
        return u * (self.init_mag / dims.sqrt()).view(-1, 1, 1)

    def adversarial_loss(self, model, batch):
        # FreeLB accumulates (1/K) Σ_t ∇_θ L(X + δ_t) over K backward passes, each δ_t held fixed. That sum is the
        # gradient of (1/K) Σ_t L(X + sg(δ_t)) — every δ_t is a detached leaf here — so the training loop's one
        # backward through all K graphs gives exactly FreeLB's accumulated average.
        p = Perturbation(self.start)
        losses = []
        for t in range(self.steps):
            loss = self.perturbed(model, batch, p)
            losses.append(loss)
            if t + 1 < self.steps:
                grads = gradients(loss, p, retain=True)  # the graph is kept for the parameters' backward
                p = Perturbation(deltas=[project(d + self.adv_lr * unit(g), self.epsilon)
                                         for d, g in zip(p.deltas, grads, strict=True)])
        return torch.stack(losses).mean(), p.deltas


class SMART(Adversarial):
    """SMART's smoothness-inducing regulariser (Jiang et al. 2020), as mt-dnn implements it: from Gaussian noise
    (σ = ``noise``), ``steps`` ascent steps of the divergence between clean and perturbed predictions, each
    δ ← ε · (δ + η g) / (‖δ + η g‖_∞ + 1e-6) per token (η = ``adv_lr``); loss = clean + λ · (D(clean ‖ adv) +
    D(adv ‖ clean)), each side's target held fixed. D is the task kind's (``TaskKind.divergence``): KL for
    classes and relations, Bernoulli KL per label, squared error for a value, KL of QA's start and end."""

    name = "smart"
    # epsilon 0.1, not mt-dnn's 1: on all-MiniLM-L6-v2 (sst2, 64 labels per class, bench/robustness.py sweep)
    # 1.0 cost 1.7 clean and 7.3 word-attack points against plain fine-tuning, 0.3 less, 0.1 none (+1.1, +0.7).
    defaults: ClassVar[dict[str, float]] = {"lambda_": 1.0, "noise": 1e-5, "steps": 1, "adv_lr": 1e-3,
                                            "epsilon": 0.1}

    def __init__(self, objective: nn.Module, **settings: float):
        super().__init__(objective, **settings)
        if not (hasattr(objective, "loss_and_logits") and hasattr(objective, "divergence")):
            raise ConfigError("adversarial.method smart compares predictions: it wraps a task head's loss only")

    @property
    def forwards(self) -> int:
        return self.steps + 2  # clean, one per step, the last point

    @property
    def backwards(self) -> int:
        return self.steps + 2  # to δ per step, then the parameters through the clean and last graphs

    def start(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(words, dtype=torch.float32) * self.noise

    def logits(self, model: SoraModel, batch: Batch, p: Perturbation) -> torch.Tensor:
        with model.perturbed(p):
            return self.objective.loss_and_logits(model, batch)[1]

    def regularizer(self, model: SoraModel, batch: Batch, clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """The symmetric divergence of clean and perturbed outputs (≥ 0; 0 when they are equal)."""
        return (self.objective.divergence(model, batch, clean.detach(), adv)
                + self.objective.divergence(model, batch, adv.detach(), clean))

    def adversarial_loss(self, model, batch):
        clean, logits = self.objective.loss_and_logits(model, batch)
        target = logits.detach()
        p = Perturbation(self.start)
        for _ in range(self.steps):
            grads = gradients(self.objective.divergence(model, batch, target, self.logits(model, batch, p)), p,
                              retain=False)
            if not all(bool(torch.isfinite(g).all()) for g in grads):  # mt-dnn: no regulariser this step
                return clean, [torch.zeros_like(d) for d in p.deltas]
            steps = [d + self.adv_lr * g for d, g in zip(p.deltas, grads, strict=True)]
            p = Perturbation(deltas=[self.epsilon * s / (s.abs().amax(-1, keepdim=True) + 1e-6) for s in steps])
        last = Perturbation(deltas=p.deltas, grad=False)
        return clean + self.lambda_ * self.regularizer(model, batch, logits, self.logits(model, batch, last)), \
            last.deltas


ADVERSARIAL_PREFIX = "adv:"  # batch keys of the attacked copies riding beside a task's clean batch


class Examples(Adversarial):
    """Adversarial examples as data (the seed's L_AT = (1/N) Σ ℓ(M_θ(X_adv), Y) literally): loss = clean loss +
    the loss on a batch of attacked copies of training examples. The copies are text, made by ``sora.attack`` on
    the model being trained (``sora.train.adversarial_data.ExamplePool``, which fine-tuning sets up for every
    wrapper with ``makes_examples``); they ride in the batch under ``ADVERSARIAL_PREFIX``. Until the first
    copies exist (or for a task whose batch carries none) this is the clean loss."""

    name = "examples"
    defaults = {"attack": "word", "every": 0, "pool": 512, "attack_options": {}}
    makes_examples: ClassVar[bool] = True

    @property
    def forwards(self) -> int:
        return 2  # the clean batch and the attacked batch (the attacks' own queries are counted apart)

    @property
    def backwards(self) -> int:
        return 2

    def adversarial_loss(self, model, batch):
        clean = self.objective(model, batch)
        attacked = {k[len(ADVERSARIAL_PREFIX):]: v for k, v in batch.items() if k.startswith(ADVERSARIAL_PREFIX)}
        own = getattr(self.objective, "prefix", "")
        if not any(k.startswith(own) for k in attacked):
            return clean, []
        return clean + self.objective(model, attacked), []


ADVERSARIAL: dict[str, type[Adversarial]] = {cls.name: cls for cls in (
    FGM,
    PGD,
    FreeLB,
    SMART,
    Examples,
)}


def build_adversarial(cfg: AdversarialConfig, objective: nn.Module) -> nn.Module:
    """``objective`` wrapped by the recipe's method (``none``: itself), with the keys the recipe sets."""
    if cfg.method == "none":
        return objective
    try:
        cls = ADVERSARIAL[cfg.method]
    except KeyError:
        raise ConfigError(f"adversarial.method: unknown {cfg.method!r} (choose from none, "
                          f"{', '.join(ADVERSARIAL)})") from None
    return cls(objective, **{k: v for k, v in cfg.model_dump(exclude={"method"}).items() if v is not None})
