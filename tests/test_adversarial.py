"""Adversarial training objectives (issue 13): FGM, PGD, FreeLB and SMART as wrappers of a task loss, through the
model's one seam (``SoraModel.perturbed``: a δ on the word embeddings' output at real tokens).

Tiny native models (dim 32, one layer, no dropout) built directly from a ``ModelConfig``; one end-to-end
fine-tuning run on examples/sample."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import SAMPLE

import sora
from sora.config import AdversarialConfig, ModelConfig, load_finetune_recipe
from sora.errors import ConfigError
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import save_checkpoint
from sora.models.heads import HeadSpec, add_head
from sora.objectives import ADVERSARIAL, TaskLoss, build_adversarial
from sora.objectives.adversarial import ADVERSARIAL_PREFIX, FGM, PGD, SMART, Examples, FreeLB, Perturbation
from sora.objectives.reconstruction import Reconstruction
from sora.tasks import kind_of
from sora.text.tokenizer import train_tokenizer
from sora.train.adversarial_data import ExamplePool
from sora.train.finetune import head_spec, run_finetune

CFG = ModelConfig(vocab_size=60, dim=32, layers=1, heads=2, ffn_dim=64, code_dim=16, decoder_layers=0, dropout=0.0,
                  max_length=64)
LABELS = ["a", "b", "c"]
SPECS = {
    "classification": HeadSpec(type="classification", outputs=3, labels=LABELS, dropout=0.0),
    "pair": HeadSpec(type="pair", reads="siamese", pair=True, pair_mode="siamese", outputs=3, labels=LABELS,
                     dropout=0.0),
    "multilabel": HeadSpec(type="multilabel", outputs=3, labels=LABELS, dropout=0.0),
    "regression": HeadSpec(type="regression", outputs=1, dropout=0.0),
    "relation": HeadSpec(type="relation", reads="entities", outputs=3, labels=LABELS, dropout=0.0),
    "qa": HeadSpec(type="qa", reads="tokens", outputs=2, pair=True, dropout=0.0),
}
METHODS = ["fgm", "pgd", "freelb", "smart"]


def tiny(kind: str = "classification") -> tuple[SoraModel, TaskLoss]:
    torch.manual_seed(0)
    model = SoraModel(CFG)
    add_head(model, "t", SPECS[kind])
    return model.train(), TaskLoss("t", kind)


def ids_and_mask(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(5, CFG.vocab_size, mask.shape, generator=g).masked_fill(~mask, CFG.pad_id)
    return ids, mask


LENGTHS = [7, 4, 10, 2]  # enough padding that the encoder takes its unpadded path (Unpad)


def batch_for(kind: str) -> dict[str, torch.Tensor]:
    ids, mask = ids_and_mask(LENGTHS, 1)
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind in ("classification", "pair", "relation"):
        batch["labels"] = torch.tensor([0, 1, 2, 1])
    if kind == "pair":
        batch["b_input_ids"], batch["b_attention_mask"] = ids_and_mask([3, 9, 5, 6], 2)
    if kind == "multilabel":
        batch["labels"] = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    if kind == "regression":
        batch["labels"] = torch.tensor([0.1, 0.9, 0.4, 0.7])
    if kind == "relation":
        batch["entity_starts"] = torch.tensor([[0, 3], [1, 2], [4, 8], [0, 1]])
    if kind == "qa":
        batch["start_positions"], batch["end_positions"] = torch.tensor([2, 1, 5, 0]), torch.tensor([4, 3, 8, 1])
    return batch


def wrapped(method: str, objective: TaskLoss, **settings) -> torch.nn.Module:
    return build_adversarial(AdversarialConfig(method=method, **settings), objective)


def assert_zero_at_padding(deltas: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    assert len(deltas) == len(masks)
    for d, m in zip(deltas, masks, strict=True):
        assert d.shape == (*m.shape, CFG.dim)
        assert torch.all(d[~m] == 0)
        assert d[m].abs().sum() > 0


# ---- the seam ------------------------------------------------------------------------------------------------


def test_the_seam_perturbs_word_embeddings_at_real_tokens_only():
    model, _ = tiny()
    ids, mask = ids_and_mask(LENGTHS, 1)
    clean = model.run(ids, mask)
    seen = []

    def at_padding(i, words, m):
        seen.append((i, words.shape))
        return (~m).unsqueeze(-1).float() * 3.0

    with model.perturbed(at_padding):
        padded = model.run(ids, mask)
    assert seen == [(0, (4, 10, CFG.dim))]  # the word embeddings of the padded batch, before Unpad
    assert torch.equal(padded.code, clean.code)  # a δ at padding is dropped
    with model.perturbed(lambda i, words, m: torch.randn_like(words)):  # (a constant shift: LayerNorm removes it)
        moved = model.run(ids, mask)
    assert (moved.code - clean.code).abs().max() > 1e-3
    assert model.encoder.perturb is None  # only inside the block
    assert torch.equal(model.run(ids, mask).code, clean.code)


# ---- 1: each perturbation lies in its ball, zero at padding -------------------------------------------------


@pytest.mark.parametrize(("method", "settings"), [("fgm", {"epsilon": 0.5}), ("pgd", {"epsilon": 0.5}),
                                                  ("freelb", {"epsilon": 0.05}), ("freelb", {})])
def test_l2_perturbations_lie_within_epsilon_and_are_zero_at_padding(method, settings):
    model, objective = tiny()
    adv = wrapped(method, objective, **settings)
    batch = batch_for("classification")
    adv(model, batch)
    assert_zero_at_padding(adv.last_deltas, [batch["attention_mask"]])
    norms = adv.last_deltas[0].flatten(1).norm(dim=1)
    if adv.epsilon > 0:
        assert torch.all(norms <= adv.epsilon + 1e-5), norms
    if method == "fgm":  # one full step
        assert torch.allclose(norms, torch.full_like(norms, adv.epsilon), atol=1e-5)
    if method == "freelb" and not settings:  # unbounded: init_mag/√3 at the start, then one step of adv_lr
        assert torch.all(norms <= 0.6 + 0.1 + 1e-5)
    assert adv.last_norm == pytest.approx(float(norms.mean()), rel=1e-5)


def test_smart_perturbation_is_the_per_token_linf_normalised_ascent_step():
    model, objective = tiny()
    adv = wrapped("smart", objective, epsilon=0.25)
    batch = batch_for("classification")
    adv(model, batch)
    assert_zero_at_padding(adv.last_deltas, [batch["attention_mask"]])
    top = adv.last_deltas[0].abs().amax(-1)[batch["attention_mask"]]  # per real token
    assert torch.all(top <= 0.25) and torch.all(top > 0.2)


# ---- 2: the adversarial loss is above the clean one ---------------------------------------------------------


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_the_adversarial_loss_exceeds_the_clean_loss(method):
    model, objective = tiny()
    batch = batch_for("classification")
    clean = float(objective(model, batch).detach())
    total = float(wrapped(method, objective)(model, batch).detach())  # clean + adversarial
    assert total - clean > clean + 1e-3, (clean, total - clean)


@pytest.mark.parametrize("method", ["freelb", "smart"])
def test_freelb_and_smart_change_the_loss(method):
    model, objective = tiny()
    batch = batch_for("classification")
    clean = float(objective(model, batch).detach())
    loss = float(wrapped(method, objective)(model, batch).detach())
    # SMART's default radius (0.1) moves this tiny model's loss by ~7e-4: far above float32 noise (~1e-7).
    assert abs(loss - clean) > 1e-4, (clean, loss)


def test_validation_sees_the_clean_loss():
    model, objective = tiny()
    batch = batch_for("classification")
    for method in METHODS:
        adv = wrapped(method, objective)
        with torch.no_grad():
            assert torch.equal(adv.eval()(model, batch), objective(model, batch))


# ---- 3: FreeLB's gradient is the average of its steps' gradients --------------------------------------------


def test_freelb_gradient_is_the_average_of_the_step_gradients():
    model, objective = tiny()
    batch = batch_for("classification")
    adv = FreeLB(objective, steps=3, adv_lr=0.2, init_mag=0.6, epsilon=0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    adv(model, batch).backward()
    got = [p.grad.clone() for p in params]
    model.zero_grad()

    # By hand, as FreeLB's Algorithm 1: the gradient at each δ_t, accumulated / K; δ_{t+1} = Π(δ_t + α g/‖g‖_F).
    torch.manual_seed(5)
    mask = batch["attention_mask"]
    delta = None

    def add(i, words, m):
        nonlocal delta
        if delta is None:
            mag = 0.6 / (m.sum(1).float() * words.shape[-1]).sqrt()
            delta = torch.empty_like(words).uniform_(-1, 1) * m.unsqueeze(-1) * mag.view(-1, 1, 1)
            delta.requires_grad_()
        return delta

    expected = [torch.zeros_like(p) for p in params]
    for t in range(3):
        with model.perturbed(add):
            loss = objective(model, batch)
        *g_params, g_delta = torch.autograd.grad(loss, [*params, delta])
        expected = [e + g / 3 for e, g in zip(expected, g_params, strict=True)]
        if t < 2:
            step = delta + 0.2 * g_delta / g_delta.flatten(1).norm(dim=1).view(-1, 1, 1)
            norm = step.flatten(1).norm(dim=1).view(-1, 1, 1)
            delta = torch.where(norm > 0.3, step * 0.3 / norm, step).detach() * mask.unsqueeze(-1)
            delta.requires_grad_()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert (adv.forwards, adv.backwards) == (3, 5)


# ---- 4: SMART's regulariser --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["classification", "multilabel", "regression", "qa"])
def test_smart_regulariser_is_nonnegative_and_zero_without_perturbation(kind):
    model, objective = tiny(kind)
    batch = batch_for(kind)
    smart = SMART(objective)
    clean, logits = objective.loss_and_logits(model, batch)
    assert float(smart.regularizer(model, batch, logits, logits).detach()) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        other = logits + torch.randn(logits.shape, generator=g)
        assert float(smart.regularizer(model, batch, logits, other).detach()) > 1e-3
    # ε = 0: the perturbed pass is the clean pass, so the loss is the task loss exactly
    zero = SMART(objective, epsilon=0.0)
    assert float(zero(model, batch).detach()) == pytest.approx(float(clean.detach()), abs=1e-6)
    assert float(SMART(objective)(model, batch).detach()) > float(clean.detach())


# ---- 6: every task kind, siamese pairs and QA included (shapes) -----------------------------------------------


@pytest.mark.parametrize("kind", ["pair", "qa", "relation"])
@pytest.mark.parametrize("method", METHODS)
def test_methods_run_on_siamese_pairs_qa_and_relations(kind, method):
    model, _ = tiny(kind)
    objective = TaskLoss("t", kind, prefix="t/")  # as in multi-task batches: its keys carry the task's prefix
    batch = {f"t/{k}": v for k, v in batch_for(kind).items()}
    adv = wrapped(method, objective)
    loss = adv(model, batch)
    assert loss.shape == () and torch.isfinite(loss)
    masks = [batch["t/attention_mask"]] + ([batch["t/b_attention_mask"]] if kind == "pair" else [])
    assert_zero_at_padding(adv.last_deltas, masks)  # siamese: one δ per text, each of its own length
    loss.backward()
    assert model.encoder.embeddings.word.weight.grad is not None
    assert model.heads["t"].out.weight.grad.abs().sum() > 0


# ---- configuration -----------------------------------------------------------------------------------------


def test_registry_defaults_and_refusals():
    assert set(ADVERSARIAL) == {"fgm", "pgd", "freelb", "smart", "examples"}
    assert all(cls.name == name for name, cls in ADVERSARIAL.items())
    assert FreeLB.defaults == {"steps": 2, "adv_lr": 0.1, "init_mag": 0.6, "epsilon": 0.0}
    assert SMART.defaults == {"lambda_": 1.0, "noise": 1e-5, "steps": 1, "adv_lr": 1e-3, "epsilon": 0.1}
    _, objective = tiny()
    assert build_adversarial(AdversarialConfig(), objective) is objective
    pgd = wrapped("pgd", objective, steps=5)
    assert isinstance(pgd, PGD) and (pgd.steps, pgd.epsilon, pgd.forwards) == (5, 1.0, 7)
    assert isinstance(wrapped("fgm", objective), FGM)
    with pytest.raises(ConfigError, match="adversarial.method: unknown 'vat'"):
        wrapped("vat", objective)
    with pytest.raises(ConfigError, match="adversarial.init_mag: fgm does not read it"):
        wrapped("fgm", objective, init_mag=0.1)
    with pytest.raises(ConfigError, match="smart compares predictions"):
        SMART(Reconstruction("delete", 0.6))
    with pytest.raises(ConfigError, match="adversarial.lambda_"):
        load_finetune_recipe(None, {"adversarial.lambda_": -1})
    assert isinstance(Perturbation().deltas, list)


# ---- 5: fine-tuning end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A random tiny native model with a BPE trained on the sample (no pretraining: only the wiring is tested)."""
    texts = [json.loads(line)["text"] for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    cfg = CFG.model_copy(update=dict(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                     cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
                                     dropout=0.1))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("adv") / "init", SoraModel(cfg), tokenizer)


def test_finetune_with_fgm_end_to_end(init_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run_finetune(load_finetune_recipe(None, {
        "finetune.init": str(init_checkpoint), "output": str(out), "tasks.0.data": str(SAMPLE),
        "data.max_length": 32, "finetune.max_steps": 4, "finetune.head_init": "zero", "train.progress": False,
        "train.device": "cpu", "adversarial.method": "fgm", "adversarial.epsilon": 0.5}))
    assert "adversarial training: fgm" in capsys.readouterr().out
    assert summary["adversarial"] == {"method": "fgm", "settings": {"epsilon": 0.5}, "forwards": 2, "backwards": 3}
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["task"] for r in rows if "task" in r]
    assert len(losses) == 4 and all(0 < v < 1e3 for v in losses)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["recipe"]["adversarial"]["method"] == "fgm"
    model = sora.load(out / "model")
    predicted = model.predict(["my invoice was charged twice"])[0]["task"]
    assert predicted["label"] in {"billing", "delivery", "finance_news", "product_review"}


def test_the_cli_flag_sets_the_method(init_checkpoint, tmp_path, capsys, monkeypatch):
    from sora import cli as sora_cli

    monkeypatch.setattr(sys, "argv", ["sora", "finetune", "--init", str(init_checkpoint), "--data", str(SAMPLE),
                                      "-o", str(tmp_path / "run"), "--max-length", "32", "--no-progress",
                                      "--device", "cpu", "--adversarial", "vat"])
    with pytest.raises(SystemExit) as exc:
        sora_cli.main()
    assert exc.value.code == 2
    assert ("adversarial.method: unknown 'vat' (choose from none, fgm, pgd, freelb, smart, examples)"
            in capsys.readouterr().err)


def test_kinds_measure_divergence_not_the_objectives():
    """SMART asks the kind; QA compares start and end distributions over real tokens only."""
    kind, batch = kind_of("qa"), batch_for("qa")
    logits = torch.randn(4, 10, 2)
    changed_at_padding = logits.masked_fill(~batch["attention_mask"].unsqueeze(-1), 7.0)
    assert float(kind.divergence(SPECS["qa"], logits, changed_at_padding, batch)) == pytest.approx(0.0, abs=1e-6)


# ---- adversarial examples as data -----------------------------------------------------------------------------


def test_the_examples_wrapper_adds_the_loss_on_the_attacked_copies():
    model, objective = tiny()
    model.eval()  # no dropout: the same batch gives the same loss
    wrapper = Examples(objective).train()
    batch = batch_for("classification")
    clean = objective(model, batch)
    assert torch.allclose(wrapper(model, batch), clean)  # no copies yet: the clean loss
    attacked = {ADVERSARIAL_PREFIX + k: v.flip(0) for k, v in batch.items()}
    both = wrapper(model, {**batch, **attacked})
    assert torch.allclose(both, clean + objective(model, {k: v.flip(0) for k, v in batch.items()}), atol=1e-6)
    other = Examples(TaskLoss("t", "classification", prefix="other/")).train()  # copies of another task only
    assert torch.allclose(other(model, {**{f"other/{k}": v for k, v in batch.items()}, **attacked}), clean)
    with pytest.raises(ConfigError, match="adversarial.epsilon: examples does not read it"):
        wrapped("examples", objective, epsilon=1.0)


def test_the_example_pool_attacks_the_training_set_and_draws_reproducible_batches(init_checkpoint):
    import dataclasses
    from pathlib import Path

    from sora.api import Sora
    from sora.config import TaskConfig
    from sora.models.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(init_checkpoint)
    task = TaskConfig(data=str(SAMPLE))
    data = kind_of(task).load(task)
    add_head(model, "task", head_spec(task, data))
    model.eval()
    # Gold labels = the model's own answers: the attack skips none of them.
    answers = Sora(model, tokenizer, {"recipe": {"data": {"max_length": 32}}}, Path("."), torch.device("cpu")).predict(
        [e.text for e in data.train])
    data = dataclasses.replace(data, train=[dataclasses.replace(e, label=a["task"]["label"])
                                            for e, a in zip(data.train, answers, strict=True)])
    settings = {"attack": "char", "every": 0, "pool": 6, "attack_options": {"max_words": 0.5}}
    pool = ExamplePool(model, tokenizer, "task", data, 32, settings, seed=3, batch_size=4)
    assert pool.batch(0, 0) == {}  # nothing before the first refresh
    record = pool.refresh(0)
    assert record["attacked"] == 6 and record["kept"] >= 3 and len(pool.rows) == record["kept"]
    originals = {tuple(r["ids"]) for r in kind_of(task).encode(data.train, model.head_specs["task"], tokenizer, 32)}
    assert all(tuple(r["ids"]) not in originals for r in pool.rows)  # every copy is perturbed
    batch = pool.batch(1, 2)
    assert set(batch) >= {ADVERSARIAL_PREFIX + "input_ids", ADVERSARIAL_PREFIX + "labels"}
    assert len(batch[ADVERSARIAL_PREFIX + "labels"]) == min(4, record["kept"])
    restored = ExamplePool(model, tokenizer, "task", data, 32, settings, seed=3, batch_size=4)
    restored.load_state_dict(json.loads(json.dumps({k: v for k, v in pool.state_dict().items() if k != "targets"}))
                             | {"targets": pool.targets})  # as a checkpoint stores it (rows through JSON)
    again = restored.batch(1, 2)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert pool.due(10, validated=True) and not pool.due(10, validated=False)
    with pytest.raises(ConfigError, match="attack_options.lexicon: the char attack does not take it"):
        ExamplePool(model, tokenizer, "task", data, 32, {**settings, "attack_options": {"lexicon": "x"}}, seed=3)


def test_finetune_with_adversarial_examples_end_to_end(init_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run_finetune(load_finetune_recipe(None, {
        "finetune.init": str(init_checkpoint), "output": str(out), "tasks.0.data": str(SAMPLE),
        "data.max_length": 32, "finetune.max_steps": 6, "finetune.head_init": "zero", "train.progress": False,
        "train.device": "cpu", "adversarial.method": "examples", "adversarial.attack": "char",
        "adversarial.every": 2, "adversarial.pool": 8}))
    printed = capsys.readouterr().out
    assert "adversarial examples for 'task' at step 0" in printed
    history = summary["adversarial"]["examples"]["task"]
    assert [h["step"] for h in history] == [0, 2, 4]  # at the start, then every 2 steps (not after the last)
    assert all(h["attacked"] == 8 and h["attack"] == "char" for h in history)
    assert summary["adversarial"]["forwards"] == 2
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "task" in r]) == 6
