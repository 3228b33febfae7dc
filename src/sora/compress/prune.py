"""Structured pruning: remove whole attention heads and whole encoder layers, physically.

Head importance follows Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): every head's
output is multiplied by a gate ξ_h = 1, and I_h = Σ_batches |∂L/∂ξ_h| with L the task loss. The gates are
put in with a forward pre-hook on each ``Attention.out`` (its input is the heads' outputs side by side,
``heads × head_dim``), so the model code is untouched. As in the paper's code, scores are L2-normalised
within each layer before the global ranking, and every layer keeps at least one head.

Pruned heads are sliced out of the fused ``qkv`` rows and the ``out`` columns; dropped layers are removed
and the rest renumbered. The result is a plain ``SoraModel`` whose ``ModelConfig`` says ``layers`` and
``layer_heads``, so it saves and loads as any checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch

from sora.models.autoencoder import SoraModel
from sora.models.heads import add_head
from sora.tasks import kind_of


def layer_head_counts(model: SoraModel) -> list[int]:
    return [layer.attn.heads for layer in model.encoder.layers]


# Importance is Σ|∂L/∂ξ| of the task's own training loss, without its fine-tuning extras (weights, contrastive).
_PLAIN_LOSS = SimpleNamespace(class_weights=None, contrastive=0.0, temperature=0.1)


def head_importance(model: SoraModel, batches: Iterable[tuple[str, dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
    """Σ |∂L/∂ξ| per head (one tensor per layer, raw, not normalised) over ``(task name, batch)`` pairs;
    each batch carries ``labels``. Only the gates get gradients; the weights are left as they were."""
    was_training = model.training
    model.eval()
    gates = [torch.ones(n, requires_grad=True) for n in layer_head_counts(model)]
    scores = [torch.zeros(n) for n in layer_head_counts(model)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def hook(gate: torch.Tensor, heads: int, head_dim: int):
        def pre(_module, args):
            x = args[0]  # (B, T, inner), or (rows, inner) when the encoder packed the real tokens (Unpad)
            g = gate.to(x.device, x.dtype)[:, None]
            return ((x.view(*x.shape[:-1], heads, head_dim) * g).view(x.shape),)

        return pre

    handles = [layer.attn.out.register_forward_pre_hook(hook(g, layer.attn.heads, layer.attn.head_dim))
               for layer, g in zip(model.encoder.layers, gates, strict=True)]
    try:
        device = next(model.parameters()).device
        for name, batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = kind_of(model.head_specs[name]).loss(model, name, batch, _PLAIN_LOSS)[0]
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for s, g in zip(scores, grads, strict=True):
                if g is not None:
                    s += g.abs().cpu()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def normalise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer L2 normalisation (Michel et al.'s code), so layers with larger gradients do not dominate."""
    return [s / (s.norm() + 1e-20) for s in scores]


def plan_pruning(scores: list[torch.Tensor], head_fraction: float = 0.0, drop_layers: int = 0,
                 layer_order: str = "importance") -> dict[str, Any]:
    """Which layers and heads to keep. ``drop_layers`` go first (lowest summed raw importance, or the top
    ones with ``layer_order="top"``); then ``head_fraction`` of the remaining heads, lowest normalised
    importance first, each layer keeping one head at least."""
    n_layers = len(scores)
    if not 0.0 <= head_fraction < 1.0:
        raise ValueError(f"head fraction {head_fraction} is not in [0, 1)")
    if not 0 <= drop_layers < n_layers:
        raise ValueError(f"cannot drop {drop_layers} of {n_layers} layers (at least one must stay)")
    if layer_order == "top":
        dropped = list(range(n_layers - drop_layers, n_layers))
    elif layer_order == "importance":
        sums = [float(s.sum()) for s in scores]
        dropped = sorted(sorted(range(n_layers), key=lambda i: sums[i])[:drop_layers])
    else:
        raise ValueError(f"layer order {layer_order!r}: use importance or top")
    layers = [i for i in range(n_layers) if i not in dropped]
    norm = normalise(scores)
    kept = {i: list(range(len(scores[i]))) for i in layers}
    total = sum(len(v) for v in kept.values())
    n_remove = int(round(head_fraction * total))
    ranked = sorted((float(norm[i][h]), i, h) for i in layers for h in kept[i])
    removed: list[tuple[int, int]] = []
    for _, i, h in ranked:
        if len(removed) == n_remove:
            break
        if len(kept[i]) > 1:
            kept[i].remove(h)
            removed.append((i, h))
    return {"layers": layers, "heads": [kept[i] for i in layers], "dropped_layers": dropped,
            "removed_heads": sorted(removed), "heads_before": total + sum(len(scores[i]) for i in dropped),
            "heads_after": total - len(removed)}


def _head_rows(heads: list[int], head_dim: int, inner: int, parts: int) -> torch.Tensor:
    """Row indices of ``heads`` in a fused projection of ``parts`` blocks of ``inner`` rows (qkv: 3)."""
    per_block = [p * inner + h * head_dim + d for p in range(parts) for h in heads for d in range(head_dim)]
    return torch.tensor(per_block, dtype=torch.long)


def apply_pruning(model: SoraModel, plan: dict[str, Any] | None, keep_decoder: bool = True) -> SoraModel:
    """A new, smaller ``SoraModel`` holding the kept layers and heads (weights copied, nothing retrained).
    ``plan=None`` keeps every layer and head (with ``keep_decoder=False``: only the decoder goes)."""
    cfg = model.cfg
    update: dict[str, Any] = {}
    if plan is None:
        layers, heads = list(range(cfg.layers)), [list(range(n)) for n in layer_head_counts(model)]
    else:
        layers, heads = plan["layers"], plan["heads"]
        update = {"layers": len(layers), "layer_heads": [len(h) for h in heads]}
    head_dim = cfg.dim // cfg.heads
    if not keep_decoder:
        update["decoder_layers"] = 0
    new = SoraModel(cfg.model_copy(update=update))
    for name, spec in model.head_specs.items():
        add_head(new, name, spec.model_copy(deep=True))
    old = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    wanted = new.state_dict()
    for key in wanted:
        if key.startswith("encoder.layers."):
            j, rest = key[len("encoder.layers."):].split(".", 1)
            i = layers[int(j)]
            value = old[f"encoder.layers.{i}.{rest}"]
            inner = model.encoder.layers[i].attn.heads * head_dim
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                value = value.index_select(0, _head_rows(heads[int(j)], head_dim, inner, 3))
            elif rest == "attn.out.weight":
                value = value.index_select(1, _head_rows(heads[int(j)], head_dim, inner, 1))
            state[key] = value.clone()
        else:
            state[key] = old[key].clone()
    new.load_state_dict(state, strict=True)
    new.to(next(model.parameters()).device)
    return new.eval()
