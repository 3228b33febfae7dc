"""``sora compress``: head and layer pruning, PyTorch int8, ONNX (fp32 and int8), the accuracy gate, metadata.

One tiny native model (2 layers × 4 heads, dim 32) is pretrained and fine-tuned on examples/sample once per
module; every compression runs on it in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli

import sora
from sora.compress import compress
from sora.compress.onnx_export import OnnxEncoder, export_onnx
from sora.compress.prune import apply_pruning, head_importance, plan_pruning
from sora.config import load_finetune_recipe, load_recipe
from sora.data.batching import collate
from sora.errors import CheckpointError, ConfigError, SoraError
from sora.models.checkpoint import save_checkpoint
from sora.train.finetune import run_finetune
from sora.train.pretrain import run_pretrain

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample"
TINY_PRETRAIN = {
    "model.dim": 32, "model.ffn_dim": 64, "model.layers": 2, "model.heads": 4, "model.code_dim": 16,
    "model.decoder_layers": 1, "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 8,
    "data.max_length": 32, "train.lr": 3e-3, "train.progress": False, "train.device": "cpu",
}
FINETUNE = {
    "train.warmup_steps": 0, "train.eval_every": 0, "train.save_every": 0, "data.batch_size": 16,
    "data.max_length": 32, "train.progress": False, "train.device": "cpu", "train.lr": 3e-3, "finetune.epochs": 3,
}
ALWAYS = 1000.0  # a max drop no model can exceed: these tests check the mechanics, not the tiny model's accuracy


def texts() -> list[str]:
    rows = [json.loads(line) for line in (SAMPLE / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def top2_gap(scores: dict[str, float]) -> float:
    best, second = sorted(scores.values())[-2:][::-1]
    return best - second


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())




@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A tiny model pretrained (30 steps) then fine-tuned (3 epochs) on the bundled sample.

    Pretraining adds the contrastive objective, as the scratch recipe does: with reconstruction alone 30 steps
    leave codes that vary by 0.6% of their norm, every prediction is a near-tie, and tests that compare two
    models' predictions would measure noise (the spread here is about 60% of the norm)."""
    root = tmp_path_factory.mktemp("compress")
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(SAMPLE / "train.jsonl"),
                                    "output": str(root / "pre"), "train.max_steps": 30,
                                    "objectives.1.name": "contrastive", "objectives.1.ratio": 0.3}))
    run_finetune(load_finetune_recipe(None, {**FINETUNE, "finetune.init": str(root / "pre"),
                                             "tasks.0.data": str(SAMPLE), "output": str(root / "ft")}))
    return root / "ft" / "model"


@pytest.fixture(scope="module")
def compressed(finetuned, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("out")
    runs = {"prune": ("prune", {"prune_heads": 0.5}), "layer": ("prune", {"prune_layers": 1}),
            "int8": ("int8", {}), "onnx": ("onnx", {}), "onnx-int8": ("onnx-int8", {})}
    return {name: (out / name, compress(finetuned, out / name, method, max_drop=ALWAYS, **kw))
            for name, (method, kw) in runs.items()}


def test_prune_heads_physically_and_reload_identically(finetuned, compressed, tmp_path):
    path, result = compressed["prune"]
    cfg = config_of(path)["model"]
    assert cfg["layers"] == 2 and sum(cfg["layer_heads"]) == 4 and min(cfg["layer_heads"]) >= 1
    assert result["pruning"]["heads_after"] == 4 and cfg["decoder_layers"] == 0
    original, pruned = sora.load(finetuned), sora.load(path)
    assert n_params(pruned.model) < n_params(original.model)
    for layer, heads in zip(pruned.model.encoder.layers, cfg["layer_heads"], strict=True):
        assert layer.attn.qkv.weight.shape[0] == 3 * heads * 8 and layer.attn.out.weight.shape[1] == heads * 8
    # The in-memory pruned model and the one reloaded from its checkpoint agree exactly.
    model, tok = original.model, original.tokenizer
    ids = tok.encode(texts(), 32)
    batches = [(n, {**collate(ids[i:i + 8], tok.pad_id), "labels": torch.zeros(len(ids[i:i + 8]), dtype=torch.long)})
               for n in model.head_specs for i in range(0, len(ids), 8)]
    plan = plan_pruning(head_importance(model, batches), head_fraction=0.25)
    in_memory = apply_pruning(model, plan, keep_decoder=False)
    save_checkpoint(tmp_path / "p", in_memory, tok, {k: v for k, v in original.config.items()
                                                     if k not in ("format_version", "model", "heads")})
    reloaded = sora.load(tmp_path / "p")
    batch = collate(ids, tok.pad_id)
    with torch.inference_mode():
        assert torch.equal(in_memory.embed(batch["input_ids"], batch["attention_mask"]),
                           reloaded.model.embed(batch["input_ids"], batch["attention_mask"]))
    # Weights were copied, not reinitialised: with no head removed the codes are the original ones.
    unpruned = apply_pruning(model, plan_pruning(head_importance(model, batches[:2])), keep_decoder=False)
    with torch.inference_mode():
        torch.testing.assert_close(unpruned.embed(batch["input_ids"], batch["attention_mask"]),
                                   model.embed(batch["input_ids"], batch["attention_mask"]))


def test_the_saved_model_is_the_one_measured(compressed):
    for name in ("prune", "int8", "onnx-int8"):
        path, result = compressed[name]
        model = sora.load(path)
        rows = [json.loads(line) for line in (SAMPLE / "validation.jsonl").read_text().splitlines()]
        preds = model.predict([r["text"] for r in rows])
        task = next(iter(preds[0]))
        acc = np.mean([p[task]["label"] == r["label"] for p, r in zip(preds, rows, strict=True)])
        assert acc == pytest.approx(result["validation_after"]["accuracy"]), name


def test_prune_a_layer(compressed, finetuned):
    path, result = compressed["layer"]
    cfg = config_of(path)["model"]
    assert cfg["layers"] == 1 and cfg["layer_heads"] == [4]
    assert len(result["pruning"]["dropped_layers"]) == 1
    model = sora.load(path)
    assert len(model.model.encoder.layers) == 1
    assert n_params(model.model) < n_params(sora.load(finetuned).model)
    assert model.embed(texts()[:3]).shape == (3, 16)


def test_int8_loads_quantized_and_close_to_fp32(compressed, finetuned):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    path, result = compressed["int8"]
    assert config_of(path)["compression"]["method"] == "int8"
    model = sora.load(path)
    quantized = [n for n, m in model.model.named_modules() if isinstance(m, QLinear)]
    assert quantized and all(n.startswith("encoder.") and not n.endswith("ffn.down") for n in quantized)
    a, b = model.embed(texts()), sora.load(finetuned).embed(texts())
    assert cosine(a, b).min() > 0.9
    np.testing.assert_array_equal(a, sora.load(path).embed(texts()))  # quantization at load is deterministic
    assert result["size_mb"] < result["size_mb_before"] and result["code_cosine"] > 0.9


def test_onnx_fp32_matches_torch_with_dynamic_shapes(compressed):
    path, result = compressed["onnx"]
    assert (path / "model.onnx").is_file() and config_of(path)["compression"]["file"] == "model.onnx"
    onnx_model, torch_model = sora.load(path), sora.load(path, backend="torch")
    assert onnx_model.onnx is not None and torch_model.onnx is None
    for batch_size in (1, 3, 16):  # other batch sizes and lengths than the export traced
        diff = np.abs(onnx_model.embed(texts(), batch_size=batch_size) - torch_model.embed(texts())).max()
        assert diff < 1e-4
    assert result["onnx_max_abs_diff"] < 1e-4


def test_onnx_int8_loads_and_predicts(compressed, finetuned):
    path, result = compressed["onnx-int8"]
    settings = config_of(path)["compression"]
    assert settings["backend"] == "onnx" and settings["file"] == "model.int8.onnx"
    assert (path / "model.int8.onnx").is_file() and not (path / "model.onnx").exists()
    model = sora.load(path)
    assert isinstance(model.onnx, OnnxEncoder)
    preds = model.predict(texts()[:5])
    labels = set(sora.load(finetuned).model.head_specs["task"].labels)
    assert all(p["task"]["label"] in labels for p in preds)
    assert cosine(model.embed(texts()), sora.load(finetuned).embed(texts())).mean() > 0.9


def test_int8_everywhere_when_asked(finetuned, tmp_path):
    """keep_fp32=() puts the feed-forward output layers in int8 too (faster, smaller, a little less exact)."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    result = compress(finetuned, tmp_path / "t", "int8", keep_fp32=(), max_drop=ALWAYS)
    names = [n for n, m in sora.load(tmp_path / "t").model.named_modules() if isinstance(m, QLinear)]
    assert any(n.endswith("ffn.down") for n in names) and result["params"]["keep_fp32"] == []
    result = compress(finetuned, tmp_path / "o", "onnx-int8", keep_fp32=(), max_drop=ALWAYS)
    assert result["params"]["fp32_nodes"] == 0 and config_of(tmp_path / "o")["compression"]["keep_fp32"] == []


def test_metadata_recorded(compressed, finetuned):
    for name, (path, result) in compressed.items():
        meta = config_of(path)["metadata"]
        assert meta["compression"]["method"] == result["method"]
        assert "prune_heads" in meta["compression"]["params"]
        for key in ("validation_before", "validation_after", "size_mb", "latency_ms_per_text", "speedup"):
            assert meta[key] == result[key], (name, key)
        assert set(meta["validation_before"]) == {"accuracy"} and meta["speedup"] > 0
        assert (path / "tokenizer.json").is_file() and config_of(path)["heads"]
    assert config_of(compressed["prune"][0])["metadata"]["compression"]["params"]["importance_data"] == "train"


def test_gate_refuses_and_writes_nothing(finetuned, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(SoraError, match=r"validation accuracy of .task. dropped by -?[\d.]+ points > max -1000; "
                                        r"use --warn-only"):
        compress(finetuned, out, "int8", max_drop=-ALWAYS)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_warn_only_keeps_it(finetuned, tmp_path):
    out = tmp_path / "kept"
    with pytest.warns(UserWarning, match="kept"):
        result = compress(finetuned, out, "prune", max_drop=-ALWAYS, warn_only=True)
    assert result["warning"] and config_of(out)["metadata"]["compression_warning"] == result["warning"]
    assert sora.load(out).embed(["hello"]).shape == (1, 16)


def test_bad_requests(finetuned, compressed, tmp_path):
    with pytest.raises(ConfigError, match="--method"):
        compress(finetuned, tmp_path / "x", "int4")
    with pytest.raises(ConfigError, match="at least one must stay"):
        compress(finetuned, tmp_path / "x", "prune", prune_layers=2)
    with pytest.raises(ConfigError, match="already compressed"):
        compress(compressed["int8"][0], tmp_path / "x", "onnx")
    with pytest.raises(ConfigError, match="somewhere else"):
        compress(finetuned, finetuned, "int8")
    with pytest.raises(CheckpointError, match="no ONNX model"):
        sora.load(finetuned, backend="onnx")
    with pytest.raises(ConfigError, match="backend"):
        sora.load(finetuned, backend="tensorrt")
    with pytest.raises(ConfigError, match="dtype 'int4'"):
        sora.load(finetuned, dtype="int4")
    with pytest.raises(ConfigError, match="not to ONNX Runtime"):
        sora.load(compressed["onnx"][0], dtype="bfloat16")
    with pytest.raises(ConfigError, match="not to an int8 model"):
        sora.load(compressed["int8"][0], dtype="bfloat16")
    assert not (tmp_path / "x").exists()


def test_bf16_halves_the_encoder_and_keeps_the_predictions(finetuned, tmp_path, monkeypatch):
    import warnings

    from safetensors import safe_open

    from sora.errors import SoraWarning

    # compress refuses bf16 on a CPU without native bfloat16 (its timing would mean nothing there); the
    # mechanics are what this test checks, on whatever CPU runs it.
    monkeypatch.setattr("sora.compress.core.native", lambda dtype, device: True)
    path = tmp_path / "bf16"
    result = compress(finetuned, path, "bf16", max_drop=ALWAYS)
    assert config_of(path)["compression"] == {"method": "bf16", "backend": "torch", "dtype": "bfloat16"}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert {d for k, d in dtypes.items() if k.startswith("encoder.")} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.startswith(("heads.", "to_code."))} == {"F32"}
    assert result["size_mb"] < 0.6 * result["size_mb_before"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoraWarning)  # a CPU without native bfloat16 warns that it is slow
        model, as_fp32 = sora.load(path), sora.load(path, dtype="float32")
        reference = sora.load(finetuned)
        assert model.dtype == "bfloat16" and as_fp32.dtype == "float32" and reference.dtype == "float32"
        assert cosine(model.embed(texts()), reference.embed(texts())).min() > 0.99
        # Predictions are compared where the reference is not near a tie: bf16 moves a score by ~1e-3.
        ref, low = reference.predict(texts()), model.predict(texts())
        clear = [i for i, r in enumerate(ref) if top2_gap(r["task"]["scores"]) > 0.05]
        assert len(clear) >= 0.5 * len(ref)
        assert all(low[i]["task"]["label"] == ref[i]["task"]["label"] for i in clear)
        assert sora.load(finetuned, dtype="bfloat16").dtype == "bfloat16"  # at load time, any checkpoint


def test_bf16_where_the_hardware_has_none(finetuned, tmp_path, monkeypatch):
    from sora.errors import SoraWarning

    monkeypatch.setattr("sora.compress.core.native", lambda dtype, device: False)
    monkeypatch.setattr("sora.compress.runtime.native", lambda dtype, device: False)
    with pytest.raises(ConfigError, match="no native bfloat16"):
        compress(finetuned, tmp_path / "x", "bf16")
    assert not (tmp_path / "x").exists()
    with pytest.warns(SoraWarning, match="emulated"):
        sora.load(finetuned, dtype="bfloat16")


def test_math_attention_export_matches(finetuned, tmp_path):
    """The fallback used if SDPA ever stops exporting gives the same graph outputs."""
    loaded = sora.load(finetuned)
    batch = collate(loaded.tokenizer.encode(texts()[:6], 32), loaded.tokenizer.pad_id)
    assert export_onnx(loaded.model, tmp_path / "m.onnx", batch, attention="math") == "math"
    with torch.inference_mode():
        ref = loaded.model.embed(batch["input_ids"], batch["attention_mask"]).numpy()
    out = OnnxEncoder(tmp_path / "m.onnx").codes(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    assert np.abs(out - ref).max() < 1e-4


def test_cli(finetuned, tmp_path, capsys, monkeypatch):
    def run(*args: str) -> tuple[int, str, str]:
        return cli(["compress", *args], capsys, monkeypatch)

    code, out, err = run(str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--method", "int8")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "missing") in lines[0]
    code, out, err = run(str(finetuned), "-o", str(tmp_path / "o"), "--method", "prune", "--max-drop", "-1000")
    assert code == 2 and "use --warn-only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code, out, err = run(str(finetuned), "-o", str(tmp_path / "o"), "--method", "prune", "--prune-heads", "0.25",
                         "--max-drop", "100")
    assert code == 0 and "model: " in out and (tmp_path / "o" / "model.safetensors").is_file()


def test_onnx_export_changes_neither_the_model_nor_the_transformer_module(finetuned, tmp_path, monkeypatch):
    """Export used to swap ``sora.models.transformer.F`` (for math attention) and switch the caller's encoder to
    its padded path while it ran, so a server using the model meanwhile ran other code. Checked mid-export (as
    ``torch.onnx.export`` starts): every attribute of the module is the same object, and the caller's model is
    as it was and gives bit-identical codes; after export too."""
    from sora.models import transformer

    loaded = sora.load(finetuned)
    model = loaded.model
    batch = collate(loaded.tokenizer.encode(["refund please", "ok", *texts()[:3]], 32), loaded.tokenizer.pad_id)
    assert not batch["attention_mask"].all()  # padded: the encoder's usual path packs the real tokens

    def codes() -> torch.Tensor:
        with torch.inference_mode():
            return model.embed(batch["input_ids"], batch["attention_mask"])

    def settings() -> list:  # every module's plain attributes: training, encoder.unpad, attention kind, ...
        return [(n, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for n, m in model.named_modules()]

    def unchanged(attrs: dict) -> bool:  # (the tracer's warnings may add a __warningregistry__)
        return all(attrs.get(k) is v for k, v in before.items())

    reference, before, configured = codes(), dict(vars(transformer)), settings()
    seen = []
    export = torch.onnx.export

    def spy(*args, **kwargs):
        seen.append((dict(vars(transformer)), settings(), codes()))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    for attention in ("sdpa", "math"):
        assert export_onnx(model, tmp_path / f"{attention}.onnx", batch, attention=attention) == attention
    assert len(seen) == 2
    for attrs, mid_export, mid_codes in seen:
        assert unchanged(attrs)
        assert mid_export == configured
        assert torch.equal(mid_codes, reference)
    assert unchanged(dict(vars(transformer))) and settings() == configured and torch.equal(codes(), reference)


# ---- pairs: cross-encoded and siamese heads through ONNX Runtime ---------------------------------------------------

def pair_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Two pairs per sample text: with another text of its topic ("same") and of another topic ("different")."""
    import random

    rows = [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    rng = random.Random(seed)
    out = []
    for r in rows:
        for label in ("same", "different"):
            other = rng.choice([o for o in rows if o is not r and (o["label"] == r["label"]) == (label == "same")])
            out.append({"text": r["text"], "text_b": other["text"], "label": label})
    return out


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory) -> dict[str, Path | dict]:
    """A tiny model fine-tuned on two pair tasks, cross-encoded and siamese (normalised codes), compressed to
    ONNX fp32 and int8."""
    root = tmp_path_factory.mktemp("pairs")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 120), ("validation", 40)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(split, n)))
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(SAMPLE / "train.jsonl"),
                                    "output": str(root / "pre"), "train.max_steps": 30,
                                    "objectives.1.name": "contrastive", "objectives.1.ratio": 0.3}))
    run_finetune(load_finetune_recipe(None, {
        **FINETUNE, "finetune.init": str(root / "pre"), "output": str(root / "ft"),
        "tasks.0.name": "cross", "tasks.0.data": str(data), "tasks.0.pair_mode": "cross",
        "tasks.1.name": "siamese", "tasks.1.data": str(data), "tasks.1.pair_mode": "siamese",
        "tasks.1.normalize": True}))
    out = {"model": root / "ft" / "model", "pairs": pair_rows("validation", 40)}
    for method in ("onnx", "onnx-int8"):
        out[method] = compress(out["model"], root / method, method, max_drop=ALWAYS)
    return out


def test_onnx_pair_heads_run_in_onnx_runtime_and_match_torch(pair_model, monkeypatch):
    path = Path(pair_model["onnx"]["output"])
    pairs = [(r["text"], r["text_b"]) for r in pair_model["pairs"]]
    reference = sora.load(path, backend="torch").predict(pairs)
    model = sora.load(path)
    assert model.onnx is not None

    def no_torch_encoder(*args, **kwargs):
        raise AssertionError("the PyTorch encoder ran for an ONNX checkpoint")

    monkeypatch.setattr(model.model.encoder, "forward", no_torch_encoder)
    runs, run = [], model.onnx.session.run
    monkeypatch.setattr(model.onnx.session, "run", lambda *a, **k: runs.append(a) or run(*a, **k))
    predictions = model.predict(pairs)
    assert len(runs) == 2 * 3  # 80 pairs in 2 batches of up to 64: once cross-encoded, twice (a, b) for siamese
    for task in ("cross", "siamese"):
        clear = [i for i, r in enumerate(reference) if top2_gap(r[task]["scores"]) > 0.05]
        # Labels are compared where the scores are decisive (a tiny cross-encoder leaves many pairs near 0.5);
        # every probability is compared below.
        assert len(clear) >= len(pairs) // 4, task
        for i in clear:
            assert predictions[i][task]["label"] == reference[i][task]["label"], (task, i)
        for got, want in zip(predictions, reference, strict=True):
            for label, p in want[task]["scores"].items():
                assert got[task]["scores"][label] == pytest.approx(p, abs=1e-4), task


def test_the_gate_measures_the_onnx_pair_path_that_is_served(pair_model):
    """The accuracy the gate recorded is the accuracy of ``sora.load(...).predict(pairs)``, int8 included."""
    rows = pair_model["pairs"]
    for method in ("onnx", "onnx-int8"):
        result = pair_model[method]
        predictions = sora.load(result["output"]).predict([(r["text"], r["text_b"]) for r in rows])
        for task in ("cross", "siamese"):
            accuracy = np.mean([p[task]["label"] == r["label"] for p, r in zip(predictions, rows, strict=True)])
            assert accuracy == pytest.approx(result["validation_after"][f"{task}/accuracy"]), (method, task)


# ---- a seq2seq head: its decoder is kept, compressed with the encoder, and the gate is BLEU ----------------------

PAIRS = [("the red cat sleeps", "die rote Katze schläft"), ("a dog runs fast", "ein Hund rennt schnell"),
         ("two men play chess", "zwei Männer spielen Schach"), ("the girl sings", "das Mädchen singt"),
         ("a boy reads a book", "ein Junge liest ein Buch"), ("the sun is hot", "die Sonne ist heiß")]


@pytest.fixture(scope="module")
def seq2seq_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny encoder with a seq2seq head (token states, vocabulary shared and tied to the encoder's) trained by
    the kind's loss until it reproduces six pairs, saved with those pairs as its validation split (~4 s)."""
    from sora.config import ModelConfig, TaskConfig
    from sora.data.seq2seq import Seq2SeqExample
    from sora.data.tasks import TaskData
    from sora.models.autoencoder import SoraModel
    from sora.models.heads import add_head
    from sora.tasks import kind_of
    from sora.text.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("seq2seq")
    tokenizer = train_tokenizer([a for a, _ in PAIRS] * 3 + [b for _, b in PAIRS] * 3, vocab_size=300,
                                min_frequency=1)
    torch.manual_seed(0)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64,
                                  code_dim=16, decoder_layers=1, dropout=0.0))
    task = TaskConfig(name="t", type="seq2seq", head_dropout=0.0,
                      options={"label_smoothing": 0.0, "max_target_length": 16, "beam": 2})
    kind, examples = kind_of(task), [Seq2SeqExample(a, [b]) for a, b in PAIRS]
    add_head(model, "t", kind.spec(task, TaskData(task, False, None, examples), False))
    batch = kind.collate(kind.encode(examples, model.head_specs["t"], tokenizer, 32), tokenizer.pad_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss, _ = kind.loss(model, "t", batch, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = root / "data"
    data.mkdir()
    (data / "validation.jsonl").write_text("".join(json.dumps({"source": a, "target": b}, ensure_ascii=False) + "\n"
                                                   for a, b in PAIRS), encoding="utf-8")
    return {"model": save_checkpoint(root / "model", model.eval(), tokenizer), "data": data}


@pytest.mark.parametrize("method", ["int8", "bf16", "onnx"])
def test_a_seq2seq_head_keeps_its_decoder_and_is_gated_on_bleu(seq2seq_model, method, tmp_path, monkeypatch):
    import warnings

    from torch.ao.nn.quantized import dynamic as qdynamic

    from sora.errors import SoraWarning

    for where in ("core", "runtime"):  # bf16's mechanics on any CPU
        monkeypatch.setattr(f"sora.compress.{where}.native", lambda dtype, device: True)
    src, out = seq2seq_model["model"], tmp_path / method
    result = compress(src, out, method, data=str(seq2seq_model["data"]), latency_repeats=1)
    # The gate measured the head's own metric on generated texts, and timed generation, not the encoder alone.
    assert result["validation_before"] == {"bleu": pytest.approx(100.0)}
    assert result["validation_after"] == {"bleu": pytest.approx(100.0)}
    assert result["accuracy_drop_points"] == pytest.approx(0.0) and result["latency_of"] == "generate"
    assert config_of(out)["heads"]["t"]["module"] == "seq2seq"
    reference = sora.load(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoraWarning)  # bf16 on a CPU without it warns that it is slow
        loaded = sora.load(out)
        assert loaded.generate([a for a, _ in PAIRS]) == [b for _, b in PAIRS]
    head, ref_head = loaded.model.heads["t"], reference.model.heads["t"]
    ref_state = ref_head.state_dict()
    assert len(ref_head.decoder.layers) == 1 and len(head.decoder.layers) == 1
    assert head.decoder.word is loaded.model.encoder.embeddings.word  # still tied after compression
    if method == "int8":  # the decoder's linear layers are int8 like the encoder's (not the tied output matrix)
        assert isinstance(head.decoder.layers[0].attn.qkv, qdynamic.Linear)
        assert isinstance(loaded.model.encoder.layers[0].attn.qkv, qdynamic.Linear)
        assert head.decoder.word.weight.dtype == torch.float32
    elif method == "bf16":  # the decoder in the encoder's dtype: it could not be otherwise, its embedding is tied
        assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
        for k, v in head.state_dict().items():
            torch.testing.assert_close(v.float(), ref_state[k], atol=0.02, rtol=0.01)
    else:  # the ONNX graph is the encoder; the head decodes in PyTorch from its token states, weights unchanged
        assert loaded.onnx is not None and (out / "model.onnx").is_file()
        for k, v in head.state_dict().items():
            assert torch.equal(v, ref_state[k])
    with pytest.raises(SoraError, match="validation bleu of 't' dropped"):  # a gate no model passes refuses
        compress(src, tmp_path / "refused", method, data=str(seq2seq_model["data"]), max_drop=-1.0,
                 latency_repeats=1)
    assert not (tmp_path / "refused").exists()
