"""Online Merging Optimizers (Lu et al., 2024, arXiv 2405.17931): OnDARE and OnTIES, AdamW
variants that merge every step's update with the SFT task vector tau = theta_SFT - theta_base,
so preference training keeps more of what SFT taught (less "alignment tax").

Each step (paper Eq. 2-7), with delta the plain AdamW update -lr * m_hat / (sqrt(v_hat) + eps):
    OnDARE: theta += (1 - alpha) * F(delta) + alpha * F(tau), F keeping each entry with
            probability p (a fresh Bernoulli mask per step and per tensor: an entry is kept where
            a hash of its index, keyed by the seed, the parameter and the step, falls below p)
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
merges with zero, so its update is the sparsified AdamW step alone. On a CPU with our kernels
an OnDARE step is one compiled pass over each parameter (merging_step.cpp); elsewhere, and for
OnTIES and K > 1, torch ops. Under FSDP2 parameters are DTensors: the state (tau, the moments)
is sharded like its parameter and the step works on the local shard; OnDARE hashes each entry's
index in the whole tensor, so its masks are one process's, and OnTIES keeps the top p of each
shard rather than of the whole tensor. The state is whole-tensor shaped, so a checkpoint
gathers it and a resume cuts each process's shard from it, as torch's AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from qwen2.errors import OptionError

METHODS = ("ondare", "onties")
MASK32 = 0xFFFFFFFF


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


def hash32(x: int) -> int:
    """Chris Wellons' lowbias32, a full-avalanche 32-bit hash: OnDARE's masks are hashes of each entry's
    index, so every process, thread count and split of the work keeps the same entries, and a resumed run
    keeps those the whole run would have (merging_step.cpp computes the same)."""
    x ^= x >> 16
    x = x * 0x7FEB352D & MASK32
    x ^= x >> 15
    x = x * 0x846CA68B & MASK32
    return x ^ x >> 16


def mask_key(seed: int, number: int, step: int, role: int) -> int:
    """The key of one mask: parameter `number`'s at `step`, role 0 for the update and 1 for tau."""
    key = hash32(seed & MASK32)
    for part in (number, step, role):
        key = hash32(key ^ part & MASK32)
    return key


def keep_mask(n: int, offset: int, key: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which of the entries offset .. offset + n a mask keeps: those whose hash32(index ^ key), its top 24
    bits, falls below `threshold` (p * 2^24). int64 products keep the low 32 bits exact (they wrap mod 2^64)."""
    if offset + n > 1 << 32:
        raise OptionError("OnDARE's masks take parameters of at most 2^32 entries")
    out = torch.empty(n, dtype=torch.bool, device=device)
    for start in range(0, n, 1 << 18):  # pieces that stay in cache across the passes: 8x faster than 1 << 22
        x = torch.arange(offset + start, offset + min(n, start + (1 << 18)), device=device) ^ key
        x ^= x >> 16
        x.mul_(0x7FEB352D).bitwise_and_(MASK32)
        x ^= x >> 15
        x.mul_(0x846CA68B).bitwise_and_(MASK32)
        x ^= x >> 16
        torch.lt(x >> 8, threshold, out=out[start: start + len(x)])
    return out


def _shard_offset(p: torch.Tensor) -> int:
    """Where this process's shard of p starts in the whole tensor, as a flat index (0 unsharded). FSDP2
    shards dim 0 as torch.chunk does: ceil(rows / world) rows a process, the last ones fewer or none."""
    if not hasattr(p, "device_mesh"):
        return 0
    placements = p.placements
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise OptionError(f"OnDARE / OnTIES take parameters sharded on dim 0 (FSDP2's), not {placements}")
    rows, world = p.shape[0], p.device_mesh.size()
    chunk = -(-rows // world)
    return min(p.device_mesh.get_local_rank() * chunk, rows) * (p.numel() // max(1, rows))


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
        self.seed, self.threshold = seed, round(reserve_rate * (1 << 24))  # p in steps of 2^-24
        self.kernel = compiled_step() if method == "ondare" and reserve_rate < 1 and merge_every == 1 else None
        # the whole state now, shaped as its parameter (a DTensor under FSDP2): a checkpoint gathers it
        # whole and a resume cuts each process's shard from it, as torch's AdamW state
        for p, tau in zip(params, taus if taus is not None else [None] * len(params)):
            state = self.state[p]
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            if merge_every > 1:
                state["pending"] = torch.zeros_like(p)
            if tau is not None:
                state["tau"] = self._shard_like(p, tau)

    def load_state_dict(self, state_dict: dict) -> None:
        # a checkpoint from before the hashed masks also holds their generator's state, which nothing reads now
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "generator"})

    def _shard_like(self, p: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if tau.shape != p.shape:
            raise OptionError(f"tau has shape {tuple(tau.shape)} but its parameter {tuple(p.shape)}: the base model "
                              "(--base) must have the architecture of the model trained")
        tau = tau.detach().to(device=_local(p).device, dtype=p.dtype)
        if not hasattr(p, "device_mesh"):
            return top_fraction(tau, self.reserve_rate) if self.method == "onties" else tau
        from torch.distributed.tensor import DTensor, distribute_tensor

        local = _local(distribute_tensor(tau, p.device_mesh, p.placements))
        if self.method == "onties":
            local = top_fraction(local, self.reserve_rate)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        number = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                number += 1  # every parameter counts, stepped or not: its masks' key stays its own
                if p.grad is None:
                    continue
                x, grad, state = _local(p), _local(p.grad), self.state[p]
                state["step"] += 1
                step, m, v = state["step"], _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                tau = _local(state["tau"]) if "tau" in state else None
                if self.kernel is not None and _fits_kernel(x, grad, m, v, tau):
                    self.kernel(x, grad, m, v, tau if tau is not None else x.new_empty(0),
                                1 - group["lr"] * group["weight_decay"], beta1, beta2,
                                -group["lr"] / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, group["eps"],
                                self.alpha, _shard_offset(p), self.threshold,
                                mask_key(self.seed, number, step, 0), mask_key(self.seed, number, step, 1))
                    continue
                if group["weight_decay"]:
                    x.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
                delta = m * (-group["lr"] / (1 - beta1 ** step)) / denom  # the rounding of addcdiv, as AdamW
                if self.merge_every > 1:
                    pending = _local(state["pending"])
                    if step % self.merge_every:
                        x.add_(delta)
                        pending.add_(delta)
                        continue
                    x.sub_(pending)
                    delta.add_(pending)
                    pending.zero_()
                x.add_(self._merged(delta, tau, functools.partial(self._keep, p, number, step)))
        return loss

    def _merged(self, delta: torch.Tensor, tau: torch.Tensor | None,
                keep: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        p, alpha = self.reserve_rate, self.alpha
        if self.method == "ondare":
            if p < 1:
                delta = delta * keep(delta, 0)
            update = delta * (1 - alpha)
            if tau is not None and alpha:
                update = update + (tau * keep(tau, 1) if p < 1 else tau) * alpha
            return update
        update = top_fraction(delta, p) * (1 - alpha)
        return sign_merge(update, tau * alpha) if tau is not None and alpha else update

    def _keep(self, param: torch.Tensor, number: int, step: int, x: torch.Tensor, role: int) -> torch.Tensor:
        """OnDARE's mask of x (param's local update, role 0, or its tau, role 1) at `step`."""
        key = mask_key(self.seed, number, step, role)
        return keep_mask(x.numel(), _shard_offset(param), key, self.threshold, x.device).view(x.shape)


def compiled_step():  # noqa: ANN202 (a torch op, or None)
    """merging_step.cpp's fused step, where our CPU kernels build."""
    from qwen2.quant.kernels import gguf_ops

    ops = gguf_ops()
    return None if ops is None else ops.ondare_step_


def _fits_kernel(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
               for t in tensors)


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
