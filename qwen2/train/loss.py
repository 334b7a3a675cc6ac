"""The training loss: sum over target tokens of weight * negative log-likelihood, divided by
the caller (by the step's target count), plus for an MoE model the router load-balancing loss.
The 152k-vocabulary logits are the largest tensor of a step; LinearCrossEntropy never keeps them."""

from __future__ import annotations

import torch

from qwen2.model import Transformer
from qwen2.train.data import IGNORE, Batch

LOSS_CHUNK = 256  # rows whose float32 logits exist at once


class LinearCrossEntropy(torch.autograd.Function):
    """sum(weight_t * nll_t) of logits = hidden @ head^T, in chunks of rows, computing the gradients
    in the same pass: no (tokens x 152k) logits are kept, none are recomputed, and rows that
    predict nothing (prompts, padding) are skipped. Under bf16 autocast the products take bf16
    operands, cast once per call rather than at each product, and on the CPU the softmax and its
    gradient are one compiled call on the bf16 logits (cross_entropy.cpp) instead of ~10 passes."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
        rows = (targets != IGNORE).nonzero().flatten()
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocast else hidden.dtype
        accumulate = torch.promote_types(head.dtype, torch.float32)
        fused = fused_softmax(compute, hidden.device) if autocast else None
        with torch.autocast(device, enabled=False):
            grad_hidden = torch.zeros_like(hidden)
            grad_head = None  # the first chunk's product becomes it, later ones add to it
            total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
            weight = head.to(compute)
            chunk = 2 * LOSS_CHUNK if fused is not None else LOSS_CHUNK  # bf16 logits: twice the rows, same bytes
            for a in range(0, len(rows), chunk):
                index = rows[a: a + chunk]
                h, t, w = hidden[index].to(compute), targets[index], weights[index]
                if fused is not None:
                    grad = h @ weight.T
                    total += (fused(grad, t, w.float()) * w).sum()  # the logits become their gradient
                else:
                    logits = (h @ weight.T).to(torch.promote_types(compute, torch.float32))
                    lse = logits.logsumexp(-1)
                    total += ((lse - logits.gather(1, t[:, None])[:, 0]) * w).sum()
                    # d(sum w * nll)/d logits = w * (softmax - one_hot)
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(len(t), device=t.device), t] -= 1
                    grad *= w[:, None]
                if autocast:  # both products in autocast's dtype, as it would multiply them
                    grad = grad.to(compute)
                grad_hidden[index] = (grad.to(compute) @ weight).to(hidden.dtype)
                if ctx.needs_input_grad[1]:
                    part = grad.T @ h if autocast else grad.T.to(accumulate) @ h.to(accumulate)
                    grad_head = part.to(accumulate) if grad_head is None else grad_head.add_(part)
            if ctx.needs_input_grad[1] and grad_head is None:  # no row predicts anything
                grad_head = torch.zeros(head.shape, dtype=accumulate, device=head.device)
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.head_dtype = head.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_head = ctx.saved_tensors
        head = None if grad_head is None else (grad_head * grad_output).to(ctx.head_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), head, None, None


def fused_softmax(dtype: torch.dtype, device: torch.device):  # noqa: ANN201 (an op, or None)
    """The compiled softmax cross-entropy for bf16 logits on the CPU, where the kernels build."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    from qwen2.quant.kernels import gguf_ops

    ops = gguf_ops()
    return None if ops is None else ops.softmax_cross_entropy_


def router_balance_loss(router_logits: list[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss as transformers' Qwen2-MoE computes it:
    E * sum_e f_e * P_e over the (N, E) router logits of every MoE layer taken together, where
    f_e = (top-k choices of expert e) / tokens (so sum_e f_e = top_k) and P_e = the mean softmax
    probability of e. With `mask` (the layers' N tokens, in the same order, e.g. (B, T)) only its
    nonzero tokens count: HF's attention mask, so padding neither counts nor dilutes. Perfectly
    uniform routing gives top_k."""
    chosen_sum = prob_sum = tokens = 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # float32, as MoE.forward picks its experts
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        w = torch.ones_like(probs[:, :1]) if mask is None else mask.reshape(-1, 1).to(probs)
        chosen_sum = chosen_sum + (chosen * w).sum(0)
        prob_sum = prob_sum + (probs * w).sum(0)
        tokens = tokens + w.sum()
    return router_logits[0].shape[-1] * (chosen_sum / tokens * prob_sum / tokens).sum()


def loss_sum(model: Transformer, batch: Batch, balance: bool = False) -> torch.Tensor:
    """sum over targets of weight * negative log-likelihood (divide by the step's target count).
    With `balance`, an MoE model adds router_aux_loss_coef * router_balance_loss * this batch's
    target count: after that division a one-batch step's loss is HF's mean NLL + coef * aux, and
    micro-batches and processes add up to coef * their aux losses' mean weighted by target count,
    as the NLL part is weighted."""
    config = model.config
    router_logits = [] if balance and config.is_moe else None  # dense: nothing collected, nothing added
    hidden = model.model.norm(model.body(batch.tokens, batch.positions, router_logits=router_logits,
                                         segments=batch.segments))
    loss = LinearCrossEntropy.apply(hidden.flatten(0, 1), model.lm_head.weight, batch.targets.flatten(),
                                    batch.weights.flatten().float())
    if router_logits:  # empty if every layer is in mlp_only_layers
        aux = router_balance_loss(router_logits, config.num_experts_per_tok, mask=batch.segments >= 0)  # -1: padding
        loss = loss + config.router_aux_loss_coef * aux * (batch.targets != IGNORE).sum()
    return loss
