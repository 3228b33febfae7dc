"""The model's core: the MiniLM import reproduces transformers, and skipping padding inside the encoder
changes neither the codes nor the gradients."""

from __future__ import annotations

import pytest
import torch

from sora.config import ModelConfig
from sora.models.autoencoder import SoraModel
from sora.models.transformer import Dropout
from sora.text.tokenizer import SoraTokenizer, train_tokenizer
from sora.train.pretrain import build_model

TEXTS = ["a gripping, funny film", "the parcel never arrived and nobody answered my three emails about it",
         "ok", "银行卡被扣了两次费用", "shares of the company rose 4% after the quarterly report beat estimates"]


def _batch(tokenizer: SoraTokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    from sora.data.batching import collate

    return collate(tokenizer.encode(texts, 64), tokenizer.pad_id)


def _codes(model: SoraModel, batch: dict[str, torch.Tensor], unpad: bool) -> torch.Tensor:
    model.encoder.unpad = unpad
    try:
        return model.embed(batch["input_ids"], batch["attention_mask"])
    finally:
        model.encoder.unpad = True


def test_minilm_import_matches_transformers_with_and_without_unpadding():
    transformers = pytest.importorskip("transformers")
    from sora.models.hf_import import resolve_backbone

    path = resolve_backbone("all-MiniLM-L6-v2")
    tokenizer = SoraTokenizer.load(path)
    model = build_model(ModelConfig(backbone=str(path), code_dim=None, decoder_layers=0), tokenizer).eval()
    hf = transformers.AutoModel.from_pretrained(str(path)).eval()
    batch = _batch(tokenizer, TEXTS)
    assert batch["attention_mask"].float().mean() < 0.9  # padded enough for the unpadded path to run
    with torch.no_grad():
        states = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        reference = (states * m).sum(1) / m.sum(1)
        for unpad in (True, False):
            torch.testing.assert_close(_codes(model, batch, unpad), reference, atol=2e-5, rtol=1e-4)


def test_unpadded_encoder_gives_the_same_codes_and_gradients():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=2, heads=2, ffn_dim=64,
                                  code_dim=16, decoder_layers=1, dropout=0.0))
    batch = _batch(tokenizer, TEXTS)
    grads = []
    for unpad in (True, False):
        model.zero_grad()
        code = _codes(model, batch, unpad)
        loss = code.pow(2).sum() + model.reconstruction_loss(code, batch["input_ids"], batch["attention_mask"])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(_codes(model, batch, True), _codes(model, batch, False), atol=1e-5, rtol=1e-4)


def test_checkpoint_files_are_readable_by_other_users(tmp_path, monkeypatch):
    """safetensors writes 0600: a server in a container (uid 10001) could not read a checkpoint trained as
    another user. Saved checkpoints get the modes a plain open() gives; an unreadable one is a clear error."""
    import os

    from sora.errors import CheckpointError
    from sora.models.checkpoint import load_checkpoint, save_checkpoint

    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64,
                                  code_dim=16, decoder_layers=1))
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [path, *path.iterdir()]}
    assert modes == {"ckpt": 0o755, "config.json": 0o644, "model.safetensors": 0o644, "tokenizer.json": 0o644}
    load_checkpoint(path)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as a non-root user would see a 0600 file
    with pytest.raises(CheckpointError, match="not readable by this user"):
        load_checkpoint(path)


def test_inference_rounds_the_packed_rows_and_gives_the_same_codes():
    """At inference the encoder packs the real tokens into a matrix whose height is rounded up (few distinct
    heights keep oneDNN's kernel cache small); the extra zero rows must not change any code."""
    from sora.models.transformer import bucket_rows

    assert [bucket_rows(n) for n in (1, 17, 64, 65, 512, 513, 600)] == [1, 17, 64, 80, 512, 576, 640]
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=2, heads=2, ffn_dim=64,
                                  code_dim=16, decoder_layers=1, dropout=0.0)).eval()
    batch = _batch(tokenizer, TEXTS * 3)
    real = int(batch["attention_mask"].sum())
    assert bucket_rows(real) > real and real < batch["attention_mask"].numel()  # rounding and padding both
    heights: list[int] = []
    hook = model.encoder.layers[0].ffn.up.register_forward_pre_hook(lambda m, a: heights.append(a[0].shape[0]))
    with torch.inference_mode():
        packed = _codes(model, batch, True)
        hook.remove()
        torch.testing.assert_close(packed, _codes(model, batch, False), atol=1e-5, rtol=1e-4)
    assert heights == [bucket_rows(real)]


def test_decoder_ignores_the_padding_of_its_memory():
    """A decoder cross-attending to padded states (not Sora's one code vector) must not attend to the padding:
    each row decodes as it would against its unpadded memory, whatever the padded positions hold."""
    from sora.models.transformer import Decoder

    torch.manual_seed(0)
    word = torch.nn.Embedding(50, 32)
    decoder = Decoder(word, dim=32, layers=2, heads=2, ffn_dim=64, max_length=16, dropout=0.0).eval()
    ids, mask = torch.randint(1, 50, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    lengths = [6, 3]
    memory = torch.randn(2, 6, 32)
    memory_mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    with torch.inference_mode():
        out = decoder(ids, mask, memory, memory_mask)
        junk = decoder(ids, mask, memory.masked_fill(~memory_mask[..., None], 1e3), memory_mask)
        torch.testing.assert_close(out, junk)
        for i, n in enumerate(lengths):
            alone = decoder(ids[i:i + 1], mask[i:i + 1], memory[i:i + 1, :n])
            torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-4)
        # The code bottleneck (memory = one vector, no mask) is unchanged.
        code = memory[:, :1]
        one = torch.ones(2, 1, dtype=torch.bool)
        torch.testing.assert_close(decoder(ids, mask, code), decoder(ids, mask, code, one))


def test_dropout_keeps_the_rate_and_the_expectation_and_is_seeded():
    drop = Dropout(0.1).train()
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    zeroed = float((y == 0).float().mean())
    assert abs(zeroed - 0.1) < 0.004 and abs(float(y.mean()) - 1.0) < 0.01
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - round(0.1 * 65536))))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient is the mask times the scale
    torch.manual_seed(0)
    torch.testing.assert_close(drop(x), y)  # the same seed draws the same mask
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x
    odd = Dropout(0.5).train()(torch.ones(3, 5, 7))  # a size not a multiple of four
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
