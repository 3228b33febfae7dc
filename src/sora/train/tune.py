"""``sora tune``: search fine-tuning hyper-parameters with Optuna, stopping bad trials early.

Each trial fine-tunes a copy of the recipe (output ``DIR/trial-NNN``) with parameters drawn by a seeded TPE
sampler. The validation score (the selection metric of ``run_finetune``) is reported to the trial after every
evaluation, and a median pruner stops trials that fall below the median of earlier trials at the same
evaluation. The study is summarised in ``trials.csv`` / ``trials.md``, ``study.json`` and ``best_recipe.yaml``
(the recipe with the best parameters, ready for ``sora finetune``).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sora.config import FinetuneRecipe, apply_overrides, load_finetune_recipe
from sora.errors import CheckpointError, ConfigError, DataError, SoraError, missing

if TYPE_CHECKING:
    import optuna

Runner = Callable[..., dict[str, Any]]  # run_finetune(recipe, report=...)
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


class _TrialFailed(Exception):
    """A trial that failed on its own (e.g. the loss diverged at a high lr); the study goes on."""


def raw_recipe(path: str | Path | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe as a plain dict (YAML plus overrides), validated: the base that trial parameters go on.

    A section the YAML leaves out is written in (before the overrides) with the values that differ from its class
    defaults: ``FinetuneRecipe.train`` defaults to eval_every=0, warmup_steps=0, lr=5e-5, but a ``train:`` section
    created by an override such as ``train.lr`` alone would start from ``TrainConfig``'s pretraining defaults
    (200, 100, 5e-4).
    """
    load_finetune_recipe(path, overrides)  # errors (missing file, bad YAML, bad key) name the problem
    raw = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path is not None else None) or {}
    for name, value in load_finetune_recipe(path):
        if name not in raw and hasattr(value, "model_dump") and value.model_dump(exclude_defaults=True):
            raw[name] = value.model_dump(mode="json", exclude_defaults=True)
    return apply_overrides(raw, copy.deepcopy(overrides or {}))


def has_decoder(recipe: FinetuneRecipe) -> bool:
    """Whether the model being fine-tuned has a decoder (so the auxiliary denoising loss is possible)."""
    from sora.models.checkpoint import is_sora_checkpoint, read_config

    init = recipe.finetune.init
    if init and is_sora_checkpoint(init):
        return bool((read_config(init).get("model") or {}).get("decoder_layers"))
    return bool(recipe.model.decoder_layers)


def search_space(recipe: FinetuneRecipe, decoder: bool = True) -> dict[str, dict[str, Any]]:
    """Dotted recipe key -> distribution. Epochs range around the recipe's value (half to double)."""
    epochs = recipe.finetune.epochs or 10.0  # unset: around the few-label schedule's 10
    lo = max(1, math.floor(epochs / 2))
    space: dict[str, dict[str, Any]] = {
        "train.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "finetune.epochs": {"type": "int", "low": lo, "high": max(lo + 1, math.ceil(2 * epochs))},
        "tasks.0.head_dropout": {"type": "float", "low": 0.0, "high": 0.5},
    }
    if decoder:
        space["finetune.aux_denoise_weight"] = {"type": "float", "low": 0.0, "high": 1.0}
    return space


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, dist in space.items():
        if dist["type"] == "int":
            params[key] = trial.suggest_int(key, dist["low"], dist["high"])
        elif dist["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, dist["choices"])
        else:
            params[key] = trial.suggest_float(key, dist["low"], dist["high"], log=dist.get("log", False))
    return params


class Objective:
    """One trial: fine-tune ``raw`` + the suggested parameters into ``out_dir/trial-NNN``; return the best score.

    ``report(evaluation, score)`` from ``run_finetune`` goes to ``trial.report``; when the pruner says so it
    raises ``optuna.TrialPruned``, which ends the fine-tuning run. Recipe, data and checkpoint errors would hit
    every trial alike, so they stop the study; other Sora errors (a diverged loss) fail just this trial.
    """

    def __init__(self, raw: dict[str, Any], space: dict[str, dict[str, Any]], out_dir: Path,
                 runner: Runner | None = None, keep_checkpoints: bool = False):
        self.raw, self.space, self.out_dir = raw, space, out_dir
        self.runner, self.keep_checkpoints = runner, keep_checkpoints

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from sora.train.finetune import run_finetune

        params = suggest(trial, self.space)
        out = self.out_dir / f"trial-{trial.number:03d}"
        trial.set_user_attr("output", str(out))
        raw = apply_overrides(copy.deepcopy(self.raw), {**params, "output": str(out), "train.progress": False})
        recipe = load_finetune_recipe(None, raw)
        scores: list[float] = []

        def report(evaluation: int, score: float) -> None:
            scores.append(score)
            trial.set_user_attr("best_validation", max(scores))
            trial.set_user_attr("evaluations", len(scores))
            trial.report(score, evaluation)
            if trial.should_prune():
                raise optuna.TrialPruned(f"evaluation {evaluation}: {score:.4f} is below the median")

        try:
            summary = (self.runner or run_finetune)(recipe, report=report)
        except (ConfigError, DataError, CheckpointError):
            raise
        except SoraError as exc:
            trial.set_user_attr("error", str(exc))
            raise _TrialFailed(str(exc)) from exc
        finally:
            if not self.keep_checkpoints:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)  # model/ (the best weights) stays
        if not scores:  # a runner that never validated (run_finetune always does at its last step)
            raise _TrialFailed(f"trial {trial.number}: no validation score was reported ({summary.get('output')})")
        return max(scores)


def _trial_row(t: optuna.trial.FrozenTrial, keys: list[str]) -> dict[str, Any]:
    seconds = None
    if t.datetime_start and t.datetime_complete:
        seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
    best = t.value if t.state.name == "COMPLETE" else t.user_attrs.get("best_validation")
    return {"number": t.number, "state": STATES.get(t.state.name, t.state.name.lower()),
            **{k: t.params.get(k) for k in keys}, "best_validation": best,
            "evaluations": t.user_attrs.get("evaluations", 0), "seconds": seconds,
            "output": t.user_attrs.get("output"), "error": t.user_attrs.get("error")}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}"
    return str(value)


SHORT = {"train.lr": "lr", "finetune.epochs": "epochs", "tasks.0.head_dropout": "dropout",
         "finetune.aux_denoise_weight": "aux α"}


def trials_table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells (shared by trials.md and the CLI's table)."""
    header = ["trial", "state", *[SHORT.get(k, k.split(".")[-1]) for k in keys], f"best val {metric}", "evals",
              "seconds"]
    cells = [[str(r["number"]), r["state"], *[_fmt(r[k]) for k in keys], _fmt(r["best_validation"]),
              str(r["evaluations"]), "" if r["seconds"] is None else f"{r['seconds']:.1f}"] for r in rows]
    return header, cells


def _markdown(header: list[str], cells: list[list[str]], summary: dict[str, Any]) -> str:
    lines = [f"# Tuning: {summary['recipe'] or 'recipe'}", "",
             f"{summary['n_trials']} trials ({', '.join(f'{v} {k}' for k, v in summary['states'].items())}); "
             f"selection metric: validation {summary['metric']} (higher is better).", ""]
    best = summary.get("best")
    if best:
        lines += [f"Best: trial {best['number']}, {summary['metric']} {best['value']:.4f}, "
                  + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best["params"].items())
                  + ". Recipe: `best_recipe.yaml`.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def selection_metric(recipe: FinetuneRecipe) -> str:
    from sora.tasks import kind_of

    names = [t.metric or kind_of(t).default_metric for t in recipe.tasks]
    return names[0] if len(set(names)) == 1 and len(names) == 1 else "mean(" + ", ".join(names) + ")"


def run_tune(recipe_path: str | Path | None, overrides: dict[str, Any] | None = None, trials: int | None = 20,
             timeout: float | None = None, out_dir: str | Path | None = None, seed: int = 13, *,
             space: dict[str, dict[str, Any]] | None = None, pruner: optuna.pruners.BasePruner | None = None,
             runner: Runner | None = None, keep_checkpoints: bool = False,
             echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the study; ``timeout`` in seconds (no new trial starts after it). Returns the study summary.

    ``space`` replaces the default search space (see ``search_space``); ``pruner`` the median pruner;
    ``runner`` replaces ``run_finetune`` (tests). Trials keep ``model/`` but not ``checkpoints/`` unless
    ``keep_checkpoints``.
    """
    try:
        import optuna
    except ImportError as exc:
        raise missing(exc, "sora tune") from exc

    if trials is None and timeout is None:
        raise ConfigError("tune needs a number of trials or a timeout")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: must be at least 1")
    raw = raw_recipe(recipe_path, overrides)
    recipe = load_finetune_recipe(None, copy.deepcopy(raw))
    out = Path(out_dir) if out_dir else Path(f"{recipe.output.rstrip('/')}-tune")
    out.mkdir(parents=True, exist_ok=True)
    if space is None:
        space = search_space(recipe, has_decoder(recipe))
    keys = list(space)
    metric = selection_metric(recipe)

    n = trials or 0
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, n // 3)) if n else 10)
    if pruner is None:  # prune from the second evaluation on, once a few trials have finished
        pruner = optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, n // 4)) if n else 5, n_warmup_steps=2)

    def progress(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if echo is None:
            return
        row = _trial_row(t, keys)
        params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in t.params.items())
        score = f"{metric} {_fmt(row['best_validation'])}" if row["best_validation"] is not None else ""
        extra = f" ({row['error']})" if row["error"] else ""
        echo(f"trial {t.number}{'/' + str(trials) if trials else ''} {row['state']}: {params}  {score}  "
             f"{row['seconds'] or 0:.1f} s{extra}")

    objective = Objective(raw, space, out, runner, keep_checkpoints)
    started = time.perf_counter()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner,
                                    study_name=f"sora-tune-{out.name}")
        interrupted = False
        try:
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=(_TrialFailed,),
                           callbacks=[progress], gc_after_trial=True)
        except KeyboardInterrupt:  # Ctrl-C ends the study; what finished is still written out
            interrupted = True
            if echo:
                echo("interrupted: writing out the trials that finished")
    finally:
        optuna.logging.set_verbosity(verbosity)
    elapsed = time.perf_counter() - started

    all_trials = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    if interrupted and all_trials and all_trials[-1].state.name == "FAIL" and "error" not in all_trials[-1].user_attrs:
        all_trials = all_trials[:-1]  # the trial Ctrl-C cut short
    rows = [_trial_row(t, keys) for t in all_trials]
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    complete = [t for t in all_trials if t.state.name == "COMPLETE"]
    summary: dict[str, Any] = {
        "recipe": str(recipe_path) if recipe_path else None, "output": str(out), "metric": metric,
        "direction": "maximize", "n_trials": len(rows), "states": states, "seed": seed,
        "elapsed_s": round(elapsed, 1), "interrupted": interrupted, "space": space,
        "sampler": type(study.sampler).__name__, "pruner": type(study.pruner).__name__,
        "best": None, "trials": rows,
        "files": {k: str(out / f) for k, f in (("csv", "trials.csv"), ("markdown", "trials.md"),
                                                ("study", "study.json"))},
    }
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "output": best.user_attrs.get("output")}
        best_raw = apply_overrides(copy.deepcopy(raw), dict(best.params))
        load_finetune_recipe(None, copy.deepcopy(best_raw))  # it must load as a recipe
        head = (f"# sora tune: best of {len(rows)} trials: trial {best.number}, validation {metric} "
                f"{best.value:.4f}\n# tuned: " + ", ".join(f"{k}={v}" for k, v in best.params.items()) + "\n")
        (out / "best_recipe.yaml").write_text(head + yaml.safe_dump(best_raw, sort_keys=False, allow_unicode=True),
                                              encoding="utf-8")
        summary["files"]["best_recipe"] = str(out / "best_recipe.yaml")

    with (out / "trials.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["number", "state", *keys, "best_validation", "evaluations",
                                                "seconds", "output", "error"])
        writer.writeheader()
        writer.writerows(rows)
    header, cells = trials_table(rows, keys, metric)
    (out / "trials.md").write_text(_markdown(header, cells, summary), encoding="utf-8")
    (out / "study.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=2,
                                               ensure_ascii=False) + "\n", encoding="utf-8")
    if not complete:
        errors = [r["error"] for r in rows if r["error"]]
        raise SoraError(f"no trial completed ({', '.join(f'{v} {k}' for k, v in states.items()) or 'none ran'})"
                        + (f"; first error: {errors[0]}" if errors else "") + f"; see {out / 'trials.csv'}")
    return summary
