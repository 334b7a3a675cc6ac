"""OnDARE and OnTIES (qwen2.train.merging_optimizer): AdamW at p = 1 and alpha = 0, the paper's
merging rules elsewhere, and the step-K variant."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen2.errors import OptionError
from qwen2.train import merging_optimizer as mo
from qwen2.train.merging_optimizer import OnlineMergingAdamW, sign_merge, task_vectors, top_fraction


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(net, optimizer, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 8)
        net(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return net


@pytest.mark.parametrize("method", ["ondare", "onties"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reserve_rate_one_and_alpha_zero_equal_adamw_exactly(method, weight_decay):
    ref = _net()
    ours = copy.deepcopy(ref)
    taus = [torch.randn_like(p) for p in ours.parameters()]
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=weight_decay, foreach=False))
    _train(ours, OnlineMergingAdamW(ours.parameters(), taus, method=method, lr=1e-2, weight_decay=weight_decay,
                                    reserve_rate=1.0, alpha=0.0))
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_ondare_keeps_about_p_of_each_update_unscaled():
    p = torch.nn.Parameter(torch.zeros(100_000))
    opt = OnlineMergingAdamW([p], method="ondare", lr=0.1, reserve_rate=0.25, alpha=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    moved = p.detach() != 0
    assert 0.24 < moved.float().mean() < 0.26
    # the first Adam step is -lr * sign(g) (up to eps): kept entries are not rescaled by 1/p
    assert torch.allclose(p.detach()[moved], torch.full((int(moved.sum()),), -0.1), atol=1e-6)


def test_ondare_adds_alpha_times_a_fresh_mask_of_tau_each_step():
    p = torch.nn.Parameter(torch.zeros(50_000))
    tau = torch.ones(50_000)
    opt = OnlineMergingAdamW([p], [tau], method="ondare", lr=1e-12, reserve_rate=0.5, alpha=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    first = (p.detach() > 0.1).clone()
    opt.step()
    after = p.detach()
    assert 0.48 < first.float().mean() < 0.52
    assert ((after - 0.5 * first.float()) > 0.1).float().mean() > 0.2  # the second mask is another draw
    assert set(torch.unique(after.round(decimals=3)).tolist()) <= {0.0, 0.5, 1.0}


def test_ondare_masks_are_hashes_of_each_entrys_index_so_a_shard_keeps_what_the_whole_tensor_would():
    key = mo.mask_key(seed=3, number=2, step=5, role=0)
    whole = mo.keep_mask(10_000, 0, key, threshold=1 << 22)  # p = 1/4
    assert 0.23 < whole.float().mean() < 0.27
    assert torch.equal(mo.keep_mask(3_000, 7_000, key, 1 << 22), whole[7_000:])
    assert torch.equal(whole[:50], torch.tensor([mo.hash32(i ^ key) >> 8 < 1 << 22 for i in range(50)]))
    other = mo.keep_mask(10_000, 0, mo.mask_key(3, 2, 6, 0), 1 << 22)  # the next step: another draw
    assert 0.04 < (whole & other).float().mean() < 0.085
    assert mo.keep_mask(100, 0, key, 1 << 24).all() and not mo.keep_mask(100, 0, key, 0).any()


@pytest.mark.skipif(mo.compiled_step() is None, reason="our CPU kernels do not build here (no g++ or no AVX2)")
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("with_tau", [True, False])
def test_the_compiled_ondare_step_takes_the_torch_steps_and_keeps_the_same_entries(weight_decay, with_tau):
    def run(compiled, n=40_003):  # odd: the vector loop and its scalar tail
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(n))
        opt = OnlineMergingAdamW([p], [torch.randn(n)] if with_tau else None, method="ondare", lr=1e-2,
                                 reserve_rate=0.3, alpha=0.2, weight_decay=weight_decay, seed=5)
        if compiled:
            assert opt.kernel is not None
        else:
            opt.kernel = None
        moved = []
        for _ in range(3):
            before = p.detach().clone()
            p.grad = torch.randn(n)
            opt.step()
            moved.append(p.detach() != before)
        return p.detach(), opt.state[p], moved

    (x, state, moved), (x_ref, state_ref, moved_ref) = run(True), run(False)
    # the same arithmetic; torch's lerp and addcmul round their products in their own order (a few ulps)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state["exp_avg_sq"], state_ref["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    if not weight_decay:  # every entry moves under decay; else exactly the masks' entries move
        assert all(torch.equal(a, b) for a, b in zip(moved, moved_ref))


def test_top_fraction_keeps_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05])
    assert top_fraction(x, 0.25).tolist() == [0, -5.0, 0, 2.0, 0, 0, 0, 0]
    assert torch.equal(top_fraction(x, 1.0), x)


def test_sign_merge_adds_agreeing_signs_and_keeps_the_larger_otherwise():
    a = torch.tensor([1.0, 2.0, -3.0, 0.5, 0.0])
    b = torch.tensor([2.0, -1.0, 1.0, -0.5, 3.0])
    assert sign_merge(a, b).tolist() == [3.0, 2.0, -3.0, 0.0, 3.0]


def test_onties_merges_the_top_fraction_of_the_update_with_alpha_tau_by_sign():
    torch.manual_seed(0)
    start, grad, tau = torch.zeros(1000), torch.randn(1000), torch.randn(1000) * 1e-3  # from 0: p is the update
    adam = torch.nn.Parameter(start.clone())
    adam.grad = grad.clone()
    torch.optim.AdamW([adam], lr=1e-3, weight_decay=0.0, foreach=False).step()
    delta = adam.detach()
    p = torch.nn.Parameter(start.clone())
    p.grad = grad.clone()
    OnlineMergingAdamW([p], [tau], method="onties", lr=1e-3, reserve_rate=0.1, alpha=0.3).step()
    a, b = 0.7 * top_fraction(delta, 0.1), 0.3 * top_fraction(tau, 0.1)
    expected = torch.where(a.sign() == b.sign(), a + b, torch.where(a.abs() >= b.abs(), a, b))
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-9)
    assert 100 <= (p.detach() != 0).sum() <= 200  # the union of the two top-10% sets


def test_step_k_variant_merges_the_accumulated_update_on_every_parameter():
    ref, ours = _net(), _net()
    k = 3
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, foreach=False), steps=k)
    opt = OnlineMergingAdamW(ours.parameters(), method="onties", lr=1e-2, reserve_rate=1.0, alpha=0.0, merge_every=k)
    _train(ours, opt, steps=k)
    for a, b in zip(ref.parameters(), ours.parameters()):  # every parameter moved, as AdamW's did
        assert torch.allclose(a, b, atol=1e-6)
    sparse = _net()
    opt = OnlineMergingAdamW(sparse.parameters(), method="onties", lr=1e-2, reserve_rate=0.1, alpha=0.0,
                             merge_every=k)
    start = [p.detach().clone() for p in sparse.parameters()]
    _train(sparse, opt, steps=k - 1)
    assert all((p != s).float().mean() > 0.5 for p, s in zip(sparse.parameters(), start))  # plain steps
    _train(sparse, opt, steps=1)
    for p, s in zip(sparse.parameters(), start):  # the K-th step: only the top 10% of the sum remain
        assert ((p - s).abs() > 1e-6).sum() <= max(1, int(0.1 * p.numel()))


@pytest.mark.parametrize("method", ["ondare", "onties"])
def test_a_state_dict_saved_mid_run_and_loaded_into_a_fresh_optimizer_continues_the_same_steps(method, tmp_path):
    # a checkpoint resumes from it: the moments, the step-K pending sum and tau (OnDARE's masks hash the
    # seed, the parameter and the step: the resumed optimizer is built with the run's seed, as the trainer does)
    def optimizer(net):
        taus = [torch.full_like(p, 0.5) for p in net.parameters()]
        return OnlineMergingAdamW(net.parameters(), taus, method=method, lr=1e-2, reserve_rate=0.3, alpha=0.2,
                                  merge_every=2, seed=7)

    whole = _net()
    _train(whole, optimizer(whole), steps=5)
    first = _net()
    opt = optimizer(first)
    _train(first, opt, steps=3)
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    resumed = copy.deepcopy(first)
    again = OnlineMergingAdamW(resumed.parameters(), method=method, lr=1e-2, reserve_rate=0.3, alpha=0.2,
                               merge_every=2, seed=7)  # no tau: it must come from the file
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    torch.manual_seed(1)
    for _ in range(3):  # the data of steps 4 and 5, as _train draws them
        torch.randn(6, 8)
    for _ in range(2):
        resumed(torch.randn(6, 8)).pow(2).mean().backward()
        again.step()
        again.zero_grad()
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_task_vectors_are_model_minus_base_and_none_where_the_base_has_no_parameter():
    base, sft = _net(0), _net(1)
    taus = task_vectors(sft, base)
    assert torch.equal(taus[0], sft[0].weight - base[0].weight)
    wrapped = torch.nn.Sequential(*sft, torch.nn.Linear(4, 2))
    assert task_vectors(wrapped, base)[-1] is None


def test_bad_settings_are_refused():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(OptionError, match="reserve-rate"):
        OnlineMergingAdamW(p, reserve_rate=0.0)
    with pytest.raises(OptionError, match="ondare or onties"):
        OnlineMergingAdamW(p, method="ties")
    with pytest.raises(OptionError, match="base"):
        OnlineMergingAdamW(p, [torch.zeros(3)])


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow  # three processes, a minute under load
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_fsdp2_shards_tau_like_the_parameters_and_takes_the_steps_of_one_process(tmp_path):
    probe = Path(__file__).with_name("merging_probe.py")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run([sys.executable, str(probe), str(tmp_path / "one")], check=True, env=env, timeout=120)
    run = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(29000 + os.getpid() % 500),
                          str(probe), str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for method in ("ondare", "onties"):
        one, two = torch.load(tmp_path / f"one-{method}.pt"), torch.load(tmp_path / f"two-{method}.pt")
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-5)
