"""Each sampling control does what its name says, on hand-made logits."""

import pytest
import torch

from qwen2.engine import sampling
from qwen2.engine.sampling import SamplingParams, apply_penalties, filter_logits, sample, top_logprobs
from qwen2.errors import RequestError
from qwen2.quant.blocks import compiled_ops, kernels_available

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_greedy_takes_the_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0), [], [], None) == 0


def test_top_k_keeps_k_best():
    assert kept(filter_logits(LOGITS, SamplingParams(top_k=2))) == [0, 1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)  # 0.53, 0.20, 0.12, 0.07, 0.03 (approx.)
    assert kept(filter_logits(LOGITS, SamplingParams(top_p=float(probs[0]) - 0.01))) == [0]
    assert kept(filter_logits(LOGITS, SamplingParams(top_p=float(probs[0] + probs[1]) + 0.01))) == [0, 1, 2]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = LOGITS.softmax(-1)
    threshold = float(probs[2] / probs[0]) + 1e-3
    assert kept(filter_logits(LOGITS, SamplingParams(min_p=threshold))) == [0, 1]


def test_penalties_and_bias():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={4: 10.0})
    out = apply_penalties(LOGITS.clone(), params, prompt=[1], output=[0, 0, 3])
    assert out[4] == pytest.approx(9.0)  # bias only
    assert out[0] == pytest.approx(2.0 / 2 - 0.5 - 0.5)  # repetition, presence, 2x frequency
    assert out[1] == pytest.approx(0.5)  # prompt token: repetition only
    assert out[3] == pytest.approx(0.0 * 2 - 0.75)


def test_penalties_on_a_batch_are_each_rows_own():
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                             logit_bias={4: 10.0}),
              SamplingParams(), SamplingParams(repetition_penalty=1.3, logit_bias={0: -1.0, 2: 3.0}),
              SamplingParams(frequency_penalty=1.0)]
    histories = [([1], [0, 0, 3]), ([1, 2], [3]), ([4, 0], [2, 2]), ([], [1, 1, 1, 4])]
    rows = torch.randn(4, 5)
    batch = rows.clone()
    sampling.penalize_rows(batch, params, histories)
    for row, p, (prompt, output), got in zip(rows, params, histories, batch):
        assert torch.equal(got, apply_penalties(row.clone(), p, prompt, output))
    assert torch.equal(batch[1], rows[1])  # no bias, no penalty
    assert batch[3, 1] == rows[3, 1] - 3.0 and batch[3, 4] == rows[3, 4] - 1.0


@pytest.mark.skipif(not kernels_available(), reason="the compiled kernels cannot be built on this machine")
def test_the_compiled_greedy_scan_finds_each_rows_first_maximum_as_torch_does():
    scan = compiled_ops().argmax_rows
    torch.manual_seed(0)
    rows = torch.randn(37, 1003)  # a vocabulary that is not a whole number of vectors
    rows[1, 5] = rows[1, 900] = rows[1].max() + 1  # a tie: the first
    rows[2, 1001] = 100.0  # in the tail
    rows[3] = float("-inf")
    rows[4, 17] = rows[4, 3] = float("nan")  # a NaN counts as the largest
    rows[5, 2] = float("inf")
    for logits in (rows, rows[:, :5], rows[::2, 1:]):  # shorter than a vector; strided rows
        assert sampling.greedy_tokens(logits, scan).tolist() == logits.max(-1).indices.tolist()
    assert sampling.greedy_tokens(rows.double(), scan).tolist() == rows.max(-1).indices.tolist()  # torch's, there


def test_seeded_sampling_reproduces():
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [sample(LOGITS, SamplingParams(), [], [], gen_a) for _ in range(20)]
    b = [sample(LOGITS, SamplingParams(), [], [], gen_b) for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_logprobs_report_the_chosen_token_and_alternatives():
    lp, alts = top_logprobs(LOGITS, 2, 2)
    assert lp == pytest.approx(float(LOGITS.log_softmax(-1)[2]))
    assert [t for t, _ in alts] == [0, 1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0),
                                 dict(min_p=2), dict(logit_bias={10**7: 1.0}), dict(logprobs=50)])
def test_invalid_values_are_refused_with_a_reason(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad).validate(vocab_size=100)
