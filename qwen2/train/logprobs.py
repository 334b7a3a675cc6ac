"""Log-probabilities of given tokens under the model, summed per sequence, with bounded memory.

The 152k-vocabulary logits of a whole batch would be the largest tensors of a preference step
(2 x 2 x 512 tokens x 152k x 4 bytes = 1.2 GB). TokenLogProbs computes them in chunks of rows
and keeps only the hidden states. With the head frozen (LoRA) the forward pass also keeps, per
row, d logp / d hidden = W[target] - softmax @ W (one hidden-size vector), and the backward pass
only scales it by the incoming gradient: no logits are computed twice. With the head trained
the backward pass recomputes each chunk's logits, since the head's gradient needs the softmax
weighted by the incoming gradient, known only then (unlike the SFT loss, whose gradient loss.py
computes in the forward pass).
"""

from __future__ import annotations

import torch

from qwen2.model import Transformer
from qwen2.train.data import IGNORE

CHUNK = 256  # rows whose logits exist at once


class TokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ head^T)[target] per row, float32, in chunks of rows."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        w = head.to(hidden.dtype)
        ctx.frozen_head = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        slopes = torch.empty_like(hidden) if ctx.frozen_head else None  # d logp / d hidden, per row
        for a in range(0, len(targets), CHUNK):
            logits = (hidden[a: a + CHUNK] @ w.T).float()
            t = targets[a: a + CHUNK]
            lse = logits.logsumexp(-1)
            out[a: a + CHUNK] = logits.gather(1, t[:, None])[:, 0] - lse
            if slopes is not None:
                softmax = logits.sub_(lse[:, None]).exp_()
                slopes[a: a + CHUNK] = w[t] - softmax.to(w.dtype) @ w
        if slopes is not None:
            ctx.save_for_backward(slopes)
        else:
            ctx.save_for_backward(hidden, head, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.frozen_head:
            (slopes,) = ctx.saved_tensors
            return (grad_out[:, None] * slopes).to(slopes.dtype), None, None
        hidden, head, targets = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden)
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if ctx.needs_input_grad[1] \
            else None
        w = head.to(hidden.dtype)
        for a in range(0, len(targets), CHUNK):
            h, t, g = hidden[a: a + CHUNK], targets[a: a + CHUNK], grad_out[a: a + CHUNK].float()
            # d logp_t / d logits = one_hot(t) - softmax
            grad = torch.softmax((h @ w.T).float(), -1).mul_(-g[:, None])
            grad[torch.arange(len(t), device=t.device), t] += g
            grad_hidden[a: a + CHUNK] = grad.to(h.dtype) @ w
            if grad_head is not None:
                grad_head += grad.T @ h.float()
        return grad_hidden, None if grad_head is None else grad_head.to(head.dtype), None


def sequence_logps(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) per row (B,), target count per row (B,)) of a collated batch
    (targets already shifted, IGNORE where nothing is predicted)."""
    hidden = model.model.norm(model.body(tokens, positions, segments=segments))
    B, T = targets.shape
    rows = (targets != IGNORE).flatten().nonzero().flatten()
    logps = TokenLogProbs.apply(hidden.flatten(0, 1)[rows], model.lm_head.weight, targets.flatten()[rows])
    sums = torch.zeros(B, dtype=torch.float32, device=logps.device).index_add(0, rows // T, logps)
    return sums, (targets != IGNORE).sum(1)
