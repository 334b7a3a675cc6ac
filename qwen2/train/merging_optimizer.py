"""Online Merging Optimizers (Lu et al., 2024, arXiv 2405.17931): OnDARE and OnTIES, AdamW
variants that merge every step's update with the SFT task vector tau = theta_SFT - theta_base,
so preference training keeps more of what SFT taught (less "alignment tax").

Each step (paper Eq. 2-7), with delta the plain AdamW update -lr * m_hat / (sqrt(v_hat) + eps):
    OnDARE: theta += (1 - alpha) * F(delta) + alpha * F(tau), F keeping each entry with
            probability p (a fresh Bernoulli mask per step and per tensor)
    OnTIES: theta += (1 - alpha) * F(delta) (+)sign alpha * F(tau), F keeping the top p fraction
            by magnitude; a (+)sign b = a + b where the signs agree, else the larger of the two
p is the reserve rate (paper default 0.01), alpha the merging weight (1e-7). Kept entries are
not rescaled by 1/p (the paper drops the rescale for numerical stability). merge_every = K > 1
is Algorithm 2: K - 1 plain AdamW steps, their updates remembered; on the K-th the remembered
updates are taken back, added to that step's update, and the sum is merged as above.
Decoupled weight decay is applied first, as torch.optim.AdamW does, so with p = 1 and
alpha = 0 both optimizers take exactly AdamW's steps.

Where the authors' public code (online_merging/optimizers.py) differs from the paper, and this
file follows the paper:
1. it sparsifies with F.dropout, which rescales the kept entries by 1/p;
2. it masks tau once at the start (OnDARE then merges the same few entries of tau forever;
   here OnDARE draws a new mask each step; OnTIES's magnitude mask of tau is fixed by
   definition, so it is computed once);
3. its step-K branch returns from step() after the first parameter, so the others never move
   on those steps; here every parameter takes every step.
(Its OnTIES also elects one majority sign from tau + delta instead of the paper's pairwise rule.)

A parameter without a tau (None: LoRA adapters, whose SFT delta lives in the frozen weights)
merges with zero, so its update is the sparsified AdamW step alone. Under FSDP2 parameters
are DTensors: tau is sharded like its parameter and everything works on the local shard, so
OnDARE is unchanged and OnTIES keeps the top p of each shard rather than of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qwen2.errors import OptionError

METHODS = ("ondare", "onties")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this process holds of a DTensor; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def top_fraction(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with all but its largest p fraction of entries (by magnitude) set to zero."""
    if p >= 1 or x.numel() == 0:
        return x
    k = max(1, int(p * x.numel()))
    threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def sign_merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (+)sign b: their sum where the signs agree, else the larger in magnitude (both on a tie)."""
    zero = torch.zeros_like(a)
    disagree = torch.where(a.abs() >= b.abs(), a, zero) + torch.where(b.abs() >= a.abs(), b, zero)
    return torch.where(torch.sign(a) == torch.sign(b), a + b, disagree)


class OnlineMergingAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], taus: Iterable[torch.Tensor | None] | None = None, *,
                 method: str = "ondare", lr: float = 1e-6, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, reserve_rate: float = 0.01, alpha: float = 1e-7,
                 merge_every: int = 1, seed: int = 0):
        if method not in METHODS:
            raise OptionError(f"unknown merging optimizer {method!r}; choose {' or '.join(METHODS)}")
        if not 0 < reserve_rate <= 1:
            raise OptionError(f"--reserve-rate must be in (0, 1], got {reserve_rate}")
        if not 0 <= alpha <= 1:
            raise OptionError(f"--merge-alpha must be in [0, 1], got {alpha}")
        if merge_every < 1:
            raise OptionError(f"--merge-every must be at least 1, got {merge_every}")
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.method, self.reserve_rate, self.alpha, self.merge_every = method, reserve_rate, alpha, merge_every
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.generator = torch.Generator(device=params[0].device if params else "cpu").manual_seed(seed + rank)
        for p, tau in zip(params, taus if taus is not None else [None] * len(params)):
            if tau is not None:
                self.state[p]["tau"] = self._shard_like(p, tau)

    def state_dict(self) -> dict:
        # OnDARE's masks come from this generator: a resumed run must draw the ones the whole run would
        return super().state_dict() | {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.generator.set_state(state_dict.pop("generator"))
        super().load_state_dict(state_dict)

    def _shard_like(self, p: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if tau.shape != p.shape:
            raise OptionError(f"tau has shape {tuple(tau.shape)} but its parameter {tuple(p.shape)}: the base model "
                              "(--base) must have the architecture of the model trained")
        tau = tau.detach().to(device=_local(p).device, dtype=p.dtype)
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            tau = distribute_tensor(tau, p.device_mesh, p.placements)
        tau = _local(tau)
        return top_fraction(tau, self.reserve_rate) if self.method == "onties" else tau

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                x, grad, state = _local(p), _local(p.grad), self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(x)
                    state["exp_avg_sq"] = torch.zeros_like(x)
                    if self.merge_every > 1:
                        state["pending"] = torch.zeros_like(x)
                state["step"] += 1
                step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if group["weight_decay"]:
                    x.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
                delta = m * (-group["lr"] / (1 - beta1 ** step)) / denom  # the rounding of addcdiv, as AdamW
                if self.merge_every > 1:
                    pending = state["pending"]
                    if step % self.merge_every:
                        x.add_(delta)
                        pending.add_(delta)
                        continue
                    x.sub_(pending)
                    delta.add_(pending)
                    pending.zero_()
                x.add_(self._merged(delta, state.get("tau")))
        return loss

    def _merged(self, delta: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
        p, alpha = self.reserve_rate, self.alpha
        if self.method == "ondare":
            if p < 1:
                delta = delta * self._keep(delta, p)
            update = delta * (1 - alpha)
            if tau is not None and alpha:
                update = update + (tau * self._keep(tau, p) if p < 1 else tau) * alpha
            return update
        update = top_fraction(delta, p) * (1 - alpha)
        return sign_merge(update, tau * alpha) if tau is not None and alpha else update

    def _keep(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """A Bernoulli(p) mask shaped like x, as uniform draws below p: on the CPU ~4x faster than
        torch.bernoulli of a tensor of p's, whose draws were most of a full fine-tuning step."""
        return torch.rand(x.shape, generator=self.generator, device=x.device) < p


def task_vectors(model: torch.nn.Module, base: torch.nn.Module) -> list[torch.Tensor | None]:
    """tau = theta_SFT - theta_base for each trainable parameter of `model`, by name; None for the
    parameters the base lacks (LoRA adapters)."""
    base_params = dict(base.named_parameters())
    taus = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        b = base_params.get(name)
        if b is not None and b.shape != p.shape:
            raise OptionError(f"--base differs from the model at {name}: {tuple(b.shape)} vs {tuple(p.shape)}")
        taus.append(None if b is None else (p.detach().float() - b.detach().float()).to(p.dtype))
    return taus
