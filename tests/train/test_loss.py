"""The MoE router load-balancing loss equals transformers' (load_balancing_loss_func), alone and
inside an MoE model's training loss, where HF's Qwen2MoeForCausalLM(output_router_logits=True)
gives the same loss and router gradients on the same weights; held-out (eval) losses and dense
models leave it out, and gradient checkpointing leaves its gradients unchanged. Under bf16 autocast
the fused loss on the compiled softmax gives what torch's ops give on the same bf16 logits."""


import pytest
import torch
from safetensors.torch import load_file

from qwen2.config import Qwen2Config
from qwen2.model import Transformer
from qwen2.train import loss as loss_module
from qwen2.train.data import Row, Sample, collate
from qwen2.train.lm import next_token_loss
from qwen2.train.loss import loss_sum, router_balance_loss
from qwen2.train.trainer import enable_gradient_checkpointing

transformers = pytest.importorskip("transformers")
hf_moe = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
MOE = TINY | dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  norm_topk_prob=False, mlp_only_layers=[1],
                  router_aux_loss_coef=0.5)  # a large coefficient, so a wrong aux term shows


@pytest.mark.parametrize("experts,top_k", [(4, 1), (4, 2), (8, 2), (60, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_and_its_gradient_equal_transformers(experts, top_k, masked):
    torch.manual_seed(experts + top_k)
    B, T = 3, 7
    logits = [torch.randn(B * T, experts, requires_grad=True) for _ in range(3)]
    mask = None
    if masked:  # right padding of various lengths
        mask = (torch.arange(T) < torch.tensor([[7], [4], [1]])).long()
    ours = router_balance_loss(logits, top_k, mask)
    ours.backward()
    grads = [g.grad.clone() for g in logits]
    for g in logits:
        g.grad = None
    theirs = hf_moe.load_balancing_loss_func(tuple(logits), experts, top_k, mask)
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    for got, g in zip(grads, logits):
        torch.testing.assert_close(got, g.grad)


def build_pair(tmp_path):
    torch.manual_seed(0)
    ref = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**MOE)).eval()
    ref.save_pretrained(tmp_path)
    config = Qwen2Config.from_hf_json(tmp_path)
    return ref, config, load_file(tmp_path / "model.safetensors")


def padded_batch():
    torch.manual_seed(1)
    lengths = [11, 6, 3]
    return collate([Row([Sample(torch.randint(0, 256, (n,)).tolist(), [1.0] * n, "")]) for n in lengths], 0)


def gate_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def test_moe_training_loss_and_router_gradients_equal_transformers(tmp_path):
    ref, config, weights = build_pair(tmp_path)
    ours = Transformer.from_state_dict(config, weights)
    assert config.router_aux_loss_coef == 0.5
    batch = padded_batch()
    loss = loss_sum(ours, batch, balance=True) / batch.target_tokens
    loss.backward()
    mask = batch.segments >= 0
    out = ref(batch.tokens, attention_mask=mask.long(), labels=torch.where(mask, batch.tokens, -100),
              output_router_logits=True)
    out.loss.backward()
    plain = loss_sum(ours, batch).item() / batch.target_tokens
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert loss.item() - plain == pytest.approx(0.5 * out.aux_loss.item(), rel=1e-4)
    mine, theirs = gate_grads(ours), gate_grads(ref)
    assert sorted(mine) == sorted(theirs) == ["model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6)


def test_the_trainer_adds_it_in_training_only_and_never_to_dense_models(tmp_path):
    _, config, weights = build_pair(tmp_path)
    model = Transformer.from_state_dict(config, weights)
    batch = padded_batch()
    with torch.no_grad():
        plain = loss_sum(model, batch).item()
        assert next_token_loss(model.train(), batch).item() == loss_sum(model, batch, balance=True).item() != plain
        assert next_token_loss(model.eval(), batch).item() == plain  # held-out perplexity
        dense = Transformer(Qwen2Config(**TINY))
        assert loss_sum(dense, batch, balance=True).item() == loss_sum(dense, batch).item()


def test_gradient_checkpointing_keeps_the_router_gradients(tmp_path):
    _, config, weights = build_pair(tmp_path)
    batch = padded_batch()
    grads = []
    for checkpointed in (False, True):
        model = Transformer.from_state_dict(config, {k: v.clone() for k, v in weights.items()}).train()
        if checkpointed:
            enable_gradient_checkpointing(model)
        loss_sum(model, batch, balance=True).backward()
        grads.append(gate_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_under_bf16_autocast_the_compiled_softmax_gives_torchs_loss_and_gradients(monkeypatch):
    if loss_module.fused_softmax(torch.bfloat16, torch.device("cpu")) is None:
        pytest.skip("the compiled kernels cannot be built here: the loss keeps torch's ops")
    torch.manual_seed(0)
    model = Transformer(Qwen2Config(**TINY)).train()
    tokens = torch.randint(2, 256, (2, 40))
    batch = collate([Row([Sample(row.tolist(), [1.0] * 40, f"test:{i}")]) for i, row in enumerate(tokens)], 0)

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_sum(model, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    fused_loss, fused_grads = loss_and_grads()
    monkeypatch.setattr(loss_module, "fused_softmax", lambda dtype, device: None)
    torch_loss, torch_grads = loss_and_grads()
    assert fused_loss == pytest.approx(torch_loss, rel=1e-5)
    for fused, plain in zip(fused_grads, torch_grads):  # a bf16 rounding of the logits' gradient apart at most
        assert (fused - plain).abs().max() <= 2**-7 * plain.abs().max() + 1e-8
