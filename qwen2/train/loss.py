"""The training loss: sum over target tokens of weight * negative log-likelihood, divided by
the caller (by the step's target count). The 152k-vocabulary logits are the largest tensor of a
step; LinearCrossEntropy never keeps them."""

from __future__ import annotations

import torch

from qwen2.model import Transformer
from qwen2.train.data import IGNORE, Batch

LOSS_CHUNK = 256  # rows whose logits exist at once


class LinearCrossEntropy(torch.autograd.Function):
    """sum(weight_t * nll_t) of logits = hidden @ head^T, in chunks of rows, computing the gradients
    in the same pass: no (tokens x 152k) logits are kept, none are recomputed, and rows that
    predict nothing (prompts, padding) are skipped."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
        rows = (targets != IGNORE).nonzero().flatten()
        grad_hidden = torch.zeros_like(hidden)
        accumulate = torch.promote_types(head.dtype, torch.float32)
        grad_head = torch.zeros(head.shape, dtype=accumulate, device=head.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for a in range(0, len(rows), LOSS_CHUNK):
            index = rows[a: a + LOSS_CHUNK]
            h, t, w = hidden[index], targets[index], weights[index]
            logits = (h @ head.to(h.dtype).T).to(torch.promote_types(h.dtype, torch.float32))
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, t[:, None])[:, 0]) * w).sum()
            # d(sum w * nll)/d logits = w * (softmax - one_hot)
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad *= w[:, None]
            grad_hidden[index] = (grad.to(h.dtype) @ head.to(h.dtype)).to(hidden.dtype)
            if grad_head is not None:
                grad_head += grad.T.to(accumulate) @ h.to(accumulate)
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.head_dtype = head.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_head = ctx.saved_tensors
        head = None if grad_head is None else (grad_head * grad_output).to(ctx.head_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), head, None, None


def loss_sum(model: Transformer, batch: Batch) -> torch.Tensor:
    """sum over targets of weight * negative log-likelihood (divide by the step's target count)."""
    hidden = model.model.norm(model.body(batch.tokens, batch.positions, segments=batch.segments))
    return LinearCrossEntropy.apply(hidden.flatten(0, 1), model.lm_head.weight, batch.targets.flatten(),
                                    batch.weights.flatten().float())
