"""Multi-task parts: task samplers (sora.train.samplers) and loss weightings (sora.objectives.weighting), on
synthetic sizes and tiny tensors (no model, no data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sora.errors import ConfigError
from sora.objectives.weighting import WEIGHTINGS, PCGrad, build_weighting
from sora.train.samplers import SAMPLERS, build_sampler

SIZES = {"big": 1000, "mid": 100, "small": 10}
STEPS = 20_000


def shares(sampler, steps: range) -> np.ndarray:
    d = sampler.draws(steps)
    return d.sum(0) / d.sum()


def powered(alpha: float) -> np.ndarray:
    p = np.array(list(SIZES.values()), dtype=float) ** alpha
    return p / p.sum()


# ---- samplers ----------------------------------------------------------------------------------------------------

def test_registry_names():
    assert set(SAMPLERS) == {"proportional", "temperature", "round_robin", "annealed", "all"}
    assert set(WEIGHTINGS) == {"fixed", "equal", "uncertainty", "pcgrad"}


@pytest.mark.parametrize(("name", "options", "alpha"), [
    ("proportional", {}, 1.0), ("temperature", {}, 0.5), ("temperature", {"temperature": 4.0}, 0.25),
])
def test_static_samplers_match_their_distribution(name, options, alpha):
    s = build_sampler(name, SIZES, seed=3, total_steps=STEPS, **options)
    expected = powered(alpha)
    assert np.allclose(list(s.probabilities(123).values()), expected)
    assert sum(s.probabilities(0).values()) == pytest.approx(1.0)
    assert np.allclose(shares(s, range(STEPS)), expected, atol=0.012)


def test_annealed_moves_from_proportional_towards_uniform():
    s = build_sampler("annealed", SIZES, seed=1, total_steps=STEPS)
    assert np.allclose(list(s.probabilities(0).values()), powered(1.0))
    assert np.allclose(list(s.probabilities(STEPS - 1).values()), powered(0.2))
    assert np.allclose(list(s.probabilities(10 * STEPS).values()), powered(0.2))  # past the end: stays at α = 0.2
    early, late = shares(s, range(STEPS // 2)), shares(s, range(STEPS // 2, STEPS))
    # The mean distribution over each half, from the formula α = 1 - 0.8 · step / (total_steps - 1).
    for half, observed in ((range(STEPS // 2), early), (range(STEPS // 2, STEPS), late)):
        mean = np.mean([list(s.probabilities(i).values()) for i in half[::50]], axis=0)
        assert np.allclose(observed, mean, atol=0.015)
    uniform = np.full(3, 1 / 3)
    assert np.abs(late - uniform).sum() < np.abs(early - uniform).sum() - 0.2
    assert late[2] > 2 * early[2]  # the small task gets far more of the late steps


def test_round_robin_is_an_exact_cycle():
    s = build_sampler("round_robin", SIZES, seed=0, total_steps=10)
    assert [s.tasks_at(i) for i in range(4)] == [["big"], ["mid"], ["small"], ["big"]]
    two = build_sampler("round_robin", SIZES, seed=0, total_steps=10, tasks_per_step=2)
    # k consecutive tasks of the cycle, reported in the order of ``sizes``
    assert [two.tasks_at(i) for i in range(3)] == [["big", "mid"], ["big", "small"], ["mid", "small"]]
    assert (two.draws(range(3000)).sum(0) == 2000).all()
    assert build_sampler("round_robin", SIZES, seed=9, total_steps=10).tasks_at(5) == s.tasks_at(5)


def test_all_trains_every_task_every_step():
    s = build_sampler("all", SIZES, seed=0, total_steps=100, tasks_per_step=1)  # tasks_per_step ignored
    assert all(s.tasks_at(i) == list(SIZES) for i in range(50))
    assert s.draws(range(1000)).all()
    assert s.draws_before("small", 77) == 77
    assert s.settings()["tasks_per_step"] == 3


@pytest.mark.parametrize("name", ["proportional", "temperature", "annealed"])
def test_tasks_at_is_a_pure_function_of_seed_and_step(name):
    first = build_sampler(name, SIZES, seed=5, total_steps=STEPS, tasks_per_step=1)
    late = first.tasks_at(777)  # out of order, before anything else
    run = [first.tasks_at(i) for i in range(1000)]
    fresh = build_sampler(name, SIZES, seed=5, total_steps=STEPS)
    assert fresh.tasks_at(777) == late == run[777]
    assert [fresh.tasks_at(i) for i in reversed(range(1000))] == run[::-1]
    # one draw at a time and a whole range at once agree
    rows = fresh.draws(range(1000))
    assert [[t for t, c in zip(SIZES, row, strict=True) if c] for row in rows] == run
    other = build_sampler(name, SIZES, seed=6, total_steps=STEPS)
    assert [other.tasks_at(i) for i in range(1000)] != run


def test_draws_before_equals_a_brute_force_count():
    s = build_sampler("temperature", SIZES, seed=11, total_steps=100_000, tasks_per_step=2)
    counts = dict.fromkeys(SIZES, 0)
    for step in range(5000):  # across a cache block boundary (4096)
        for task in SIZES:
            assert s.draws_before(task, step) == counts[task]
        for task in s.tasks_at(step):
            counts[task] += 1
    fresh = build_sampler("temperature", SIZES, seed=11, total_steps=100_000, tasks_per_step=2)
    assert fresh.counts_before(4999) == s.counts_before(4999)  # straight in, no sequential warm-up
    total = fresh.counts_before(100_000)  # cheap at 100k steps
    assert sum(total.values()) == 200_000
    brute = fresh.draws(range(100_000)).sum(0)
    assert list(total.values()) == brute.tolist()
    with pytest.raises(KeyError, match="unknown task"):
        s.draws_before("nope", 3)


def test_two_tasks_per_step_are_distinct():
    for name in ("proportional", "temperature", "annealed", "round_robin"):
        s = build_sampler(name, SIZES, seed=2, total_steps=1000, tasks_per_step=2)
        for step in range(300):
            tasks = s.tasks_at(step)
            assert len(tasks) == 2 and len(set(tasks)) == 2
            assert tasks == [t for t in SIZES if t in tasks]  # in the order of sizes
    # without replacement from p: the small task is in the pair more often than its first-draw share
    s = build_sampler("proportional", SIZES, seed=2, total_steps=STEPS, tasks_per_step=2)
    inclusion = s.draws(range(STEPS)).mean(0)
    assert inclusion[0] > 0.95 and inclusion[2] > s.probabilities(0)["small"] * 2


@pytest.mark.parametrize(("call", "message"), [
    (lambda: build_sampler("nope", SIZES, 0, 10), "unknown task sampler 'nope'.*annealed.*round_robin"),
    (lambda: build_sampler("proportional", SIZES, 0, 10, temperature=2.0),
     "'temperature': proportional does not take it"),
    (lambda: build_sampler("temperature", SIZES, 0, 10, temp=2.0), "'temp'.*it takes temperature"),
    (lambda: build_sampler("temperature", SIZES, 0, 10, temperature=0.0), "temperature.*> 0"),
    (lambda: build_sampler("temperature", SIZES, 0, 10, temperature=-1), "temperature.*> 0"),
    (lambda: build_sampler("proportional", {}, 0, 10), "no tasks"),
    (lambda: build_sampler("proportional", {"a": 0, "b": 3}, 0, 10), "at least one training example"),
    (lambda: build_sampler("proportional", SIZES, 0, 0), "total_steps"),
    (lambda: build_sampler("proportional", SIZES, 0, 10, tasks_per_step=0), "tasks_per_step.*between 1 and"),
    (lambda: build_sampler("proportional", SIZES, 0, 10, tasks_per_step=4), r"tasks_per_step.*\(3\)"),
])
def test_bad_sampler_settings_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_state_dict_checks_a_resumed_run_draws_the_same():
    s = build_sampler("temperature", SIZES, seed=4, total_steps=1000, tasks_per_step=2, temperature=3.0)
    state = s.state_dict()
    assert state == {"sampler": "temperature", "sizes": SIZES, "seed": 4, "total_steps": 1000,
                     "tasks_per_step": 2, "temperature": 3.0}
    build_sampler("temperature", SIZES, seed=4, total_steps=1000, tasks_per_step=2,
                  temperature=3.0).load_state_dict(state)
    # training longer does not change a static sampler's draws; it does change the annealing schedule
    build_sampler("temperature", SIZES, seed=4, total_steps=5000, tasks_per_step=2,
                  temperature=3.0).load_state_dict(state)
    annealed = build_sampler("annealed", SIZES, seed=4, total_steps=1000).state_dict()
    with pytest.raises(ConfigError, match="total_steps was 1000, now 5000"):
        build_sampler("annealed", SIZES, seed=4, total_steps=5000).load_state_dict(annealed)
    with pytest.raises(ConfigError, match="seed was 4, now 5"):
        build_sampler("temperature", SIZES, seed=5, total_steps=1000, tasks_per_step=2,
                      temperature=3.0).load_state_dict(state)
    with pytest.raises(ConfigError, match="temperature was 3.0, now 2.0"):
        build_sampler("temperature", SIZES, seed=4, total_steps=1000, tasks_per_step=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="checkpoint used 'temperature', this run 'proportional'"):
        build_sampler("proportional", SIZES, seed=4, total_steps=1000).load_state_dict(state)


# ---- weightings --------------------------------------------------------------------------------------------------

TASKS = {"a": 0.5, "b": 2.0, "c": 1.0}


def test_fixed_and_equal_combine_and_take_a_subset():
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(3.0), "c": torch.tensor(4.0, dtype=torch.bfloat16)}
    fixed, equal = build_weighting("fixed", TASKS), build_weighting("equal", TASKS)
    assert float(fixed.combine(losses)) == pytest.approx(0.5 + 6.0 + 4.0)
    assert float(equal.combine(losses)) == pytest.approx(8.0)
    assert fixed.combine(losses).dtype == torch.float32
    assert float(fixed.combine({"b": torch.tensor(3.0)})) == pytest.approx(6.0)  # the tasks a sampler picked
    assert float(equal.combine({"a": torch.tensor(1.0), "c": torch.tensor(2.0)})) == pytest.approx(3.0)
    assert fixed.weights() == TASKS and equal.weights() == dict.fromkeys(TASKS, 1.0)
    with pytest.raises(ValueError, match="unknown task 'z'"):
        fixed.combine({"z": torch.tensor(1.0)})


def test_default_backward_scales_and_accumulates():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    fixed = build_weighting("fixed", {"a": 1.0, "b": 3.0})
    for _ in range(2):
        out = fixed.backward({"a": (w * w).sum(), "b": w.sum()}, [w], scale=0.5)
    assert not out.requires_grad and float(out) == pytest.approx(0.5 * (5.0 + 9.0))
    assert torch.allclose(w.grad, 2 * 0.5 * (2 * w.detach() + 3.0))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: build_weighting("gradnorm", TASKS), "unknown loss weighting 'gradnorm'.*equal.*pcgrad.*uncertainty"),
    (lambda: build_weighting("fixed", TASKS, seed=1), "'seed': fixed does not take it"),
    (lambda: build_weighting("pcgrad", TASKS, sed=1), "'sed'.*it takes seed"),
    (lambda: build_weighting("fixed", {}), "no tasks"),
    (lambda: build_weighting("fixed", {"a": -1.0}), "finite numbers >= 0"),
    (lambda: build_weighting("fixed", {"a": float("nan")}), "finite numbers >= 0"),
])
def test_bad_weighting_settings_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_uncertainty_down_weights_the_noisier_task():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    w_true = torch.tensor([1.0, -2.0, 0.5, 3.0])
    y_noisy = x @ w_true + 1.0 * torch.randn(256)
    y_clean = x @ w_true + 0.1 * torch.randn(256)
    model = nn.Linear(4, 1)  # shared by both tasks
    weighting = build_weighting("uncertainty", {"noisy": 1.0, "clean": 1.0})
    assert len(list(weighting.parameters())) == 1  # the optimizer sees the log-variances
    assert weighting.weights() == {"noisy": 1.0, "clean": 1.0}
    opt = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=0.05)
    for _ in range(300):
        pred = model(x).squeeze(1)
        losses = {"noisy": ((pred - y_noisy) ** 2).mean(), "clean": ((pred - y_clean) ** 2).mean()}
        opt.zero_grad()
        weighting.backward(losses, list(model.parameters()))
        opt.step()
    weights = weighting.weights()
    assert weights["clean"] > 5 * weights["noisy"], weights
    assert weights["noisy"] < 1.5  # the noisy task's loss stays near σ² = 1, so its weight near 1
    # a subset of the tasks: only their log-variances get a gradient
    weighting.zero_grad()
    weighting.combine({"clean": torch.tensor(0.5)}).backward()
    assert weighting.log_vars.grad[0] == 0 and weighting.log_vars.grad[1] != 0


def _pcgrad_setup(conflict: bool):
    """A shared 2-vector θ and one head per task; the task losses are linear in θ, so their gradients are fixed."""
    theta = nn.Parameter(torch.zeros(2))
    heads = {"a": nn.Parameter(torch.tensor(1.0)), "b": nn.Parameter(torch.tensor(2.0))}
    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-2.0, 1.0]) if conflict else torch.tensor([1.0, 1.0])}

    def losses():
        return {t: (theta * g[t]).sum() + heads[t] ** 2 for t in g}

    return theta, heads, g, losses


def test_pcgrad_removes_conflicts():
    theta, heads, g, losses = _pcgrad_setup(conflict=True)
    pc = build_weighting("pcgrad", {"a": 1.0, "b": 1.0}, seed=0)
    out = pc.backward(losses(), [theta])
    assert float(out) == pytest.approx(1.0 + 4.0)
    for t in g:
        assert float(theta.grad @ g[t]) >= -1e-6
    # g_a' = g_a - (g_a·g_b)/|g_b|² g_b = (0.2, 0.4); g_b' = g_b - (g_b·g_a)/|g_a|² g_a = (0, 1)
    assert torch.allclose(theta.grad, torch.tensor([0.2, 1.4]))
    assert float(heads["a"].grad) == pytest.approx(2.0) and float(heads["b"].grad) == pytest.approx(4.0)
    plain = g["a"] + g["b"]
    assert float(plain @ g["a"]) < 0  # the plain sum would have worked against task a


def test_pcgrad_without_conflict_is_the_plain_sum_and_accumulates():
    theta, heads, g, losses = _pcgrad_setup(conflict=False)
    pc = build_weighting("pcgrad", {"a": 1.0, "b": 3.0})
    pc.backward(losses(), [theta])
    assert torch.allclose(theta.grad, g["a"] + 3 * g["b"])
    assert float(heads["b"].grad) == pytest.approx(3 * 4.0)
    pc.micro = 1
    pc.backward(losses(), [theta], scale=0.5)  # a second micro-batch adds to .grad
    assert torch.allclose(theta.grad, 1.5 * (g["a"] + 3 * g["b"]))
    assert float(heads["a"].grad) == pytest.approx(1.5 * 2.0)


def test_pcgrad_accumulates_projected_grads_and_treats_untouched_params_as_zero():
    theta, heads, g, losses = _pcgrad_setup(conflict=True)
    only_a = nn.Parameter(torch.tensor([1.0]))  # shared, but only task a reaches it
    unused = nn.Parameter(torch.tensor([1.0]))  # shared, reached by no task: keeps grad None
    pc = PCGrad({"a": 1.0, "b": 1.0})

    def with_extra():
        out = losses()
        out["a"] = out["a"] + (3 * only_a).sum()
        return out

    for micro in range(2):
        pc.step, pc.micro = 7, micro
        pc.backward(with_extra(), [theta, only_a, unused])
    assert unused.grad is None
    # over the shared vector (θ, only_a): task a's gradient (1, 0, 3), task b's (-2, 1, 0) with 0 at only_a
    full = torch.tensor([[1.0, 0.0, 3.0], [-2.0, 1.0, 0.0]])
    expected = 2 * pc.project(full)  # g_a' = (0.2, 0.4, 3), g_b' = (-1.8, 1, 0.6): summed, twice
    assert torch.allclose(torch.cat([theta.grad, only_a.grad]), expected)
    assert torch.allclose(expected, 2 * torch.tensor([-1.6, 1.4, 3.6]))
    for row in full:
        assert float(expected @ row) >= -1e-6
    assert float(heads["a"].grad) == pytest.approx(4.0)


def test_pcgrad_with_one_task_is_plain_backward_and_is_deterministic():
    theta, heads, g, losses = _pcgrad_setup(conflict=True)
    pc = build_weighting("pcgrad", {"a": 1.0, "b": 1.0})
    pc.backward({"b": losses()["b"]}, [theta], scale=2.0)
    assert torch.allclose(theta.grad, 2 * g["b"]) and heads["a"].grad is None
    # three conflicting tasks: the projection order is random but seeded by (seed, step, micro)
    grads = torch.tensor([[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.3, -0.9, 1.0]])
    a, b = PCGrad({"x": 1.0, "y": 1.0, "z": 1.0}, seed=3), PCGrad({"x": 1.0, "y": 1.0, "z": 1.0}, seed=3)
    a.step = b.step = 12
    assert torch.equal(a.project(grads), b.project(grads))
    results = set()
    for step in range(20):
        a.step = step
        results.add(tuple(round(v, 5) for v in a.project(grads).tolist()))
    assert len(results) > 1  # the order matters with three tasks, and it varies with the step
