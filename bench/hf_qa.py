"""The Hugging Face extractive-QA reference, as its users run it: ``AutoModelForQuestionAnswering`` + ``Trainer``
with the pre- and post-processing of transformers' examples/pytorch/question-answering/run_qa.py and utils_qa.py.

Rewritten compactly from those files (read, not copied), for one fast tokenizer that pads on the right
(question first, context second), SQuAD v1 (every question has an answer, no null answer):

  prepare_train_features       run_qa.prepare_train_features: windows of ``max_length`` tokens over the context
                               with ``stride`` tokens of overlap, padded to max_length (pad_to_max_length=True,
                               the default), the answer's token span labelled, or the [CLS] index when the answer
                               is not wholly inside the window
  prepare_validation_features  run_qa.prepare_validation_features: the same windows, with each feature's example id
                               and offsets kept for the context tokens only
  postprocess_qa_predictions   utils_qa.postprocess_qa_predictions (version_2_with_negative=False): the n_best
                               starts x n_best ends of every window, spans inside the context of at most
                               max_answer_length tokens, best start+end logit over all windows of the question
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# run_qa.py / its README's SQuAD recipe (python run_qa.py --model_name_or_path ... --dataset_name squad --do_train
# --do_eval --per_device_train_batch_size 12 --learning_rate 3e-5 --num_train_epochs 2 --max_seq_length 384
# --doc_stride 128); the rest TrainingArguments' defaults.
MAX_SEQ_LENGTH = 384
DOC_STRIDE = 128
N_BEST = 20
MAX_ANSWER_LENGTH = 30
LEARNING_RATE = 3e-5
BATCH_SIZE = 12
EPOCHS = 2
RECIPE = ("run_qa.py's SQuAD recipe (README): learning_rate 3e-5, per_device_train_batch_size 12, num_train_epochs "
          "as --epochs, max_seq_length / doc_stride as the bench's, pad_to_max_length=True, default_data_collator; "
          "every other TrainingArguments default (AdamW, linear decay, no warmup, no weight decay, fp32); "
          "postprocess_qa_predictions n_best_size 20, max_answer_length 30; no evaluation during training")


def _tokenize(tok: Any, rows: list[dict[str, Any]], max_length: int, stride: int) -> Any:
    # run_qa strips the questions' left whitespace: some have a lot, which would eat into the context's room.
    return tok([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
               max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
               padding="max_length")


def prepare_train_features(tok: Any, rows: list[dict[str, Any]], max_length: int = MAX_SEQ_LENGTH,
                           stride: int = DOC_STRIDE) -> list[dict[str, Any]]:
    enc = _tokenize(tok, rows, max_length, stride)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls = ids.index(tok.cls_token_id) if tok.cls_token_id in ids else 0
        seq = enc.sequence_ids(i)
        answers = rows[enc["overflow_to_sample_mapping"][i]]["answers"]
        start = end = cls
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            first = seq.index(1)  # the window's first and last context token
            last = len(seq) - 1 - seq[::-1].index(1)
            if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                s, e = first, last
                while s < len(offsets) and offsets[s][0] <= start_char:
                    s += 1
                while offsets[e][1] >= end_char:
                    e -= 1
                start, end = s - 1, e + 1
        features.append({"input_ids": ids, "token_type_ids": enc["token_type_ids"][i],
                         "attention_mask": enc["attention_mask"][i], "start_positions": start,
                         "end_positions": end})
    return features


def prepare_validation_features(tok: Any, rows: list[dict[str, Any]], max_length: int = MAX_SEQ_LENGTH,
                                stride: int = DOC_STRIDE) -> list[dict[str, Any]]:
    enc = _tokenize(tok, rows, max_length, stride)
    features = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        features.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                         "attention_mask": enc["attention_mask"][i],
                         "example_id": rows[enc["overflow_to_sample_mapping"][i]]["id"],
                         "offset_mapping": [o if seq[k] == 1 else None
                                            for k, o in enumerate(enc["offset_mapping"][i])]})
    return features


def postprocess_qa_predictions(rows: list[dict[str, Any]], features: list[dict[str, Any]], start_logits: np.ndarray,
                               end_logits: np.ndarray, n_best: int = N_BEST,
                               max_answer_length: int = MAX_ANSWER_LENGTH) -> dict[str, str]:
    if len(start_logits) != len(features):
        raise ValueError(f"{len(start_logits)} predictions for {len(features)} features")
    per_example: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(features):
        per_example[f["example_id"]].append(i)
    answers = {}
    for row in rows:
        best_score, best = -np.inf, None
        for fi in per_example[row["id"]]:
            s_log, e_log, offsets = start_logits[fi], end_logits[fi], features[fi]["offset_mapping"]
            starts = np.argsort(s_log)[-1:-n_best - 1:-1].tolist()
            ends = np.argsort(e_log)[-1:-n_best - 1:-1].tolist()
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_log[s] + e_log[e]
                    if score > best_score:
                        best_score, best = score, (offsets[s][0], offsets[e][1])
        text = row["context"][best[0]:best[1]] if best else ""
        answers[row["id"]] = text or "empty"  # utils_qa's fallback when nothing (or only "") is left
    return answers


def train_and_predict(train_rows: list[dict[str, Any]], eval_sets: dict[str, list[dict[str, Any]]], *, model_path: Path,
                      workdir: Path, seed: int, device: str, epochs: float, max_length: int = MAX_SEQ_LENGTH,
                      stride: int = DOC_STRIDE, max_steps: int | None = None,
                      log: Any = print) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Fine-tune from ``model_path`` on ``train_rows`` and predict every eval set: ({set: {id: answer}}, info)."""
    import shutil

    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    tok = AutoTokenizer.from_pretrained(str(model_path))
    if not tok.is_fast or tok.padding_side != "right":
        raise TypeError("run_qa.py's processing needs a fast tokenizer padding on the right")
    t0 = time.perf_counter()
    train = prepare_train_features(tok, train_rows, max_length, stride)
    prep_s = time.perf_counter() - t0
    log(f"  hf: {len(train_rows)} questions -> {len(train)} training features (max_length {max_length}, "
        f"stride {stride}) in {prep_s:.1f}s")
    set_seed(seed)
    out = workdir / "hf-trainer"
    shutil.rmtree(out, ignore_errors=True)
    t_load = time.perf_counter()
    model = AutoModelForQuestionAnswering.from_pretrained(str(model_path))
    # The recipe's values, the seed, no intermediate checkpoints (they change nothing), no logging integrations.
    args = TrainingArguments(output_dir=str(out), learning_rate=LEARNING_RATE, per_device_train_batch_size=BATCH_SIZE,
                             num_train_epochs=epochs, max_steps=max_steps or -1, seed=seed, save_strategy="no",
                             report_to="none", disable_tqdm=True, logging_steps=50, use_cpu=device != "cuda")
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    result = trainer.train()
    wall_s = time.perf_counter() - t_load
    info = {"steps": int(result.global_step), "seconds": float(result.metrics["train_runtime"]),
            "wall_s": round(wall_s, 1), "epochs": float(trainer.state.epoch or 0.0),
            "train_questions": len(train_rows), "train_features": len(train), "batch_size": BATCH_SIZE,
            "features_per_s": float(result.metrics["train_samples_per_second"]),
            "train_loss": float(result.metrics.get("train_loss", float("nan"))), "preprocess_s": round(prep_s, 1)}
    predictions = {}
    for name, rows in eval_sets.items():
        t1 = time.perf_counter()
        feats = prepare_validation_features(tok, rows, max_length, stride)
        inputs = [{k: f[k] for k in ("input_ids", "token_type_ids", "attention_mask")} for f in feats]
        start, end = trainer.predict(inputs).predictions[:2]
        predictions[name] = postprocess_qa_predictions(rows, feats, start, end)
        log(f"  hf: predicted {name} ({len(rows)} questions, {len(feats)} features) in "
            f"{time.perf_counter() - t1:.1f}s")
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return predictions, info
