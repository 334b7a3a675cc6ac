"""Run alone or under torchrun (FSDP2 over gloo): three steps of OnDARE and of OnTIES on a small
MLP, alpha > 0 so tau's merge shows; OnDARE keeps half of each update and of tau (its masks hash each
entry's index in the whole tensor, so the shards keep what one process keeps), OnTIES keeps all
(p = 1: its top fraction is taken per shard). Writes the final weights (rank 0) to OUT-<method>.pt.
Used by test_merging_optimizer.py."""

import sys

import torch
from torch import nn

from qwen2 import distributed
from qwen2.train.merging_optimizer import OnlineMergingAdamW


def run(method: str, out: str) -> None:
    rank, world = distributed.world()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    taus = [torch.randn_like(p) * 0.01 for p in model.parameters()]  # seeded: the same whole tau on every rank
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    optimizer = OnlineMergingAdamW(model.parameters(), taus, method=method, lr=1e-2, alpha=0.3, weight_decay=0.1,
                                   reserve_rate=0.5 if method == "ondare" else 1.0)
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 8, generator=data)
        # this rank's rows; FSDP2 averages the gradients over the ranks, the step needs their sum
        loss = model(x[rank::world]).pow(2).sum() / len(x) * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, f"{out}-{method}.pt")


if __name__ == "__main__":
    for name in ("ondare", "onties"):
        run(name, sys.argv[1])
    distributed.shutdown()
