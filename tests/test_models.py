"""Model helpers: inject, merge_and_unload, adapter state (dict and safetensors), counts; on a small
model built in code and on a Hugging Face transformers model."""

import json
import struct

import pytest
import torch
import torch.nn as nn

import polykern
from polykern import GenLoraLinear, PeraLinear


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.mlp(self.norm(self.q_proj(x) * torch.sigmoid(self.v_proj(x))))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Block(), Block(), nn.Linear(24, 5))


@torch.no_grad()
def perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, m in polykern.models.adapter_modules(model):
        for p in m.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


@pytest.mark.parametrize("method,cfg", [("pera", {"r": 3}), ("genlora", {"r": 3, "num_rbf": 6}),
                                        ("lora", {"r": 2})])
def test_inject_by_suffix_and_freeze(method, cfg):
    model = tiny_model()
    names = polykern.inject_adapters(model, ["q_proj", "v_proj"], method=method, **cfg)
    assert names == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    cls = GenLoraLinear if method == "genlora" else PeraLinear
    assert all(isinstance(model.get_submodule(n), cls) for n in names)
    if method == "lora":
        assert model.get_submodule(names[0]).terms == "none"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{p}" for n in names for p in cls.adapter_parameter_names}
    assert trainable == expected
    tr, total = polykern.count_parameters(model)
    assert tr == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in model.parameters())


def test_inject_by_regex_and_errors():
    model = tiny_model()
    names = polykern.inject_adapters(model, r"\d+\.mlp\.\d+", method="pera", r=2)
    assert names == ["0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"]
    with pytest.raises(ValueError, match="unknown adapter method 'dora'"):
        polykern.inject_adapters(tiny_model(), ["q_proj"], method="dora")
    with pytest.raises(ValueError, match="no module name in the model matches"):
        polykern.inject_adapters(tiny_model(), ["k_proj"])
    with pytest.raises(TypeError, match="target_modules must be"):
        polykern.inject_adapters(tiny_model(), [])


@pytest.mark.parametrize("method", ["pera", "genlora"])
def test_merge_and_unload_reproduces_outputs(method):
    model = tiny_model()
    polykern.inject_adapters(model, ["q_proj", "v_proj", "2"], method=method, r=3)
    perturb_adapters(model)
    x = torch.randn(4, 7, 24)
    y = model(x)
    merged = polykern.merge_and_unload(model)
    assert not polykern.models.adapter_modules(merged)
    assert all(type(m) in (nn.Linear, nn.Sequential, Block, nn.GELU, nn.LayerNorm)
               for m in merged.modules())
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["pera", "genlora"])
def test_adapter_state_dict_round_trip(method):
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj", "v_proj"], method=method, r=3)
    perturb_adapters(a)
    sd = polykern.adapter_state_dict(a)
    assert all(k.split(".")[-1] in PeraLinear.adapter_parameter_names +
               GenLoraLinear.adapter_parameter_names for k in sd)
    b = tiny_model()
    polykern.inject_adapters(b, ["q_proj", "v_proj"], method=method, r=3)
    polykern.load_adapter_state_dict(b, sd)
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))
    with pytest.raises(KeyError, match="missing"):
        polykern.load_adapter_state_dict(b, {k: v for k, v in list(sd.items())[1:]})


@pytest.mark.parametrize("method,cfg", [
    ("pera", {"r": 3, "terms": "square", "alpha": 6.0}),
    ("genlora", {"r": 2, "num_rbf": 5, "latent_dim": 2}),
    ("pera", {"r": 2, "adapter_dtype": torch.float32}),
])
def test_save_load_safetensors_rebuilds_and_is_bitwise(tmp_path, method, cfg):
    dtype = torch.bfloat16 if "adapter_dtype" in cfg else torch.float32
    a = tiny_model().to(dtype)
    polykern.inject_adapters(a, ["q_proj", "mlp.2"], method=method, **cfg)
    perturb_adapters(a)
    path = tmp_path / "adapters.safetensors"
    polykern.save_adapters(a, str(path))
    b = tiny_model().to(dtype)   # plain model: the file's metadata rebuilds the adapters
    names = polykern.load_adapters(b, str(path))
    assert sorted(names) == ["0.mlp.2", "0.q_proj", "1.mlp.2", "1.q_proj"]
    for n in names:
        assert b.get_submodule(n).adapter_config() == a.get_submodule(n).adapter_config()
    x = torch.randn(5, 24, dtype=dtype)
    assert torch.equal(a(x), b(x))
    c = tiny_model().to(dtype)   # already adapted the same way: loads in place
    polykern.inject_adapters(c, ["q_proj", "mlp.2"], method=method, **cfg)
    polykern.load_adapters(c, str(path))
    assert torch.equal(a(x), c(x))


def test_load_adapters_refuses_mismatch(tmp_path):
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj"], method="pera", r=3)
    path = str(tmp_path / "a.safetensors")
    polykern.save_adapters(a, path)
    b = tiny_model()
    polykern.inject_adapters(b, ["q_proj"], method="pera", r=4)
    with pytest.raises(ValueError, match="differs from the file"):
        polykern.load_adapters(b, path)
    with pytest.raises(ValueError, match="no polykern adapter layers"):
        polykern.save_adapters(tiny_model(), path)


@pytest.mark.parametrize("method", ["pera", "genlora"])
def test_transformers_bert_inject_train_merge(method):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=37,
                                  max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    names = polykern.inject_adapters(model, ["query", "value", "intermediate.dense"],
                                     method=method, r=4)
    assert len(names) == 6
    perturb_adapters(model)
    ids = torch.randint(0, 50, (3, 9))
    out = model(input_ids=ids).last_hidden_state
    loss = out.square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    merged = polykern.merge_and_unload(model)
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, out, rtol=1e-4,
                               atol=1e-5)


def test_second_injection_keeps_earlier_adapters_trainable():
    model = tiny_model()
    first = polykern.inject_adapters(model, ["q_proj"], method="pera", r=2)
    second = polykern.inject_adapters(model, ["mlp.0"], method="genlora", r=2, num_rbf=4)
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(first) | set(second)


def test_injection_keeps_eval_mode():
    model = tiny_model().eval()
    polykern.inject_adapters(model, ["q_proj"], method="pera", r=2, dropout=0.5)
    perturb_adapters(model)
    assert not any(m.training for m in model.modules())
    x = torch.randn(3, 24)
    assert torch.equal(model(x), model(x))  # no adapter dropout in eval mode


def test_save_adapters_from_gathered_state(tmp_path):
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj"], method="pera", r=2)
    perturb_adapters(a)
    gathered = {k: v.clone() for k, v in polykern.adapter_state_dict(a).items()}
    path = str(tmp_path / "g.safetensors")
    polykern.save_adapters(a, path, state_dict=gathered)
    b = tiny_model()
    polykern.load_adapters(b, path)
    x = torch.randn(2, 24)
    assert torch.equal(a(x), b(x))
    with pytest.raises(KeyError, match="differ"):
        polykern.save_adapters(a, path, state_dict={"nope": torch.zeros(1)})


def model_snapshot(model):
    """Everything a load could change: module types, parameter values, dtypes and flags."""
    return ([(n, type(m).__name__, m.training) for n, m in model.named_modules()],
            [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()])


def assert_same_snapshot(before, after):
    assert before[0] == after[0]
    assert [(n, g) for n, _, g in before[1]] == [(n, g) for n, _, g in after[1]]
    for (n, a, _), (_, b, _) in zip(before[1], after[1]):
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_load_adapters_freezes_the_rest_like_inject(tmp_path):
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj", "mlp.2"], method="genlora", r=2, num_rbf=4)
    path = str(tmp_path / "a.safetensors")
    polykern.save_adapters(a, path)
    b = tiny_model()
    polykern.load_adapters(b, path)
    trainable = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-1].startswith("genlora_") for n in trainable)
    assert polykern.count_parameters(b) == polykern.count_parameters(a)


class Wider(nn.Module):
    """tiny_model's layout with a head of another width: the same names, other shapes."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.add_module("0", Block())
        self.add_module("1", Block())
        self.add_module("2", nn.Linear(24, 6))


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    """Every check runs before the first change: a layer the model lacks, a tensor of another
    shape, a config that differs (on a later layer than the first) leave the model as it was."""
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj", "2"], method="pera", r=3)
    perturb_adapters(a)
    path = str(tmp_path / "a.safetensors")
    polykern.save_adapters(a, path)
    lacking = nn.Sequential(Block(), Block())                  # no layer "2"
    wider = Wider()                                            # "2" is (6, 24), the file's (5, 24)
    differing = tiny_model()                                   # "1.q_proj" with another r
    polykern.inject_adapters(differing, ["1.q_proj"], method="pera", r=4)
    adapted = tiny_model()                                     # adapted alike, then a wrong shape
    polykern.inject_adapters(adapted, ["q_proj", "2"], method="pera", r=3)
    cases = [(lacking, KeyError, "which the model lacks"),
             (wider, ValueError, r"shape \(5, 3\) in the file, \(6, 3\) in the model"),
             (differing, ValueError, "differs from the file")]
    for model, error, message in cases:
        before = model_snapshot(model)
        with pytest.raises(error, match=message):
            polykern.load_adapters(model, path)
        assert_same_snapshot(before, model_snapshot(model))
    state = polykern.adapter_state_dict(a)
    state["2.lora_B"] = torch.zeros(6, 3)                      # the last key, after the others
    before = model_snapshot(adapted)
    with pytest.raises(ValueError, match="2.lora_B"):
        polykern.load_adapter_state_dict(adapted, state)
    assert_same_snapshot(before, model_snapshot(adapted))


def corrupt_tensor_bytes(path, key):
    """Overwrite the middle bytes of tensor ``key`` in a safetensors file, header untouched."""
    raw = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    mid = 8 + n + (start + end) // 2
    raw[mid - 4:mid + 4] = b"\x7f" * 8                          # floats near 3e38
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("method", ["pera", "genlora"])
def test_corrupted_tensor_bytes_are_refused(tmp_path, method):
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj", "v_proj"], method=method, r=3)
    perturb_adapters(a)
    path = str(tmp_path / "a.safetensors")
    polykern.save_adapters(a, path)
    key = sorted(polykern.adapter_state_dict(a))[2]
    corrupt_tensor_bytes(path, key)
    from safetensors.torch import load_file
    assert not torch.equal(load_file(path)[key], polykern.adapter_state_dict(a)[key])
    for b in (tiny_model(), a):                          # rebuilding, and loading in place
        before = model_snapshot(b)
        with pytest.raises(ValueError, match=f"checksum.*{key}|{key}.*checksum"):
            polykern.load_adapters(b, path)
        assert_same_snapshot(before, model_snapshot(b))


def test_files_without_checksums_still_load(tmp_path):
    """A file written before checksums (the same metadata less theirs) loads as it did."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj"], method="pera", r=2)
    perturb_adapters(a)
    path = str(tmp_path / "a.safetensors")
    polykern.save_adapters(a, path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in meta.items() if "checksum" not in k}
    assert len(old) < len(meta)                          # the new file has checksums to drop
    old["polykern_format_version"] = "1"
    save_file(load_file(path), path, metadata=old)
    b = tiny_model()
    polykern.load_adapters(b, path)
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))


def test_config_mismatch_names_the_differing_keys(tmp_path):
    a = tiny_model()
    polykern.inject_adapters(a, ["q_proj"], method="pera", r=3, alpha=6, terms="full")
    path = str(tmp_path / "a.safetensors")
    polykern.save_adapters(a, path)
    b = tiny_model()
    polykern.inject_adapters(b, ["q_proj"], method="pera", r=4, alpha=6, terms="square")
    with pytest.raises(ValueError) as err:
        polykern.load_adapters(b, path)
    message = str(err.value)
    assert "r: model 4, file 3" in message and "terms: model 'square', file 'full'" in message
    assert "alpha:" not in message and "dropout:" not in message   # those agree


class WithOddLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)    # out_proj: a subclass of nn.Linear
        self.conv = nn.Conv1d(8, 8, 1)
        self.q_proj = nn.Linear(8, 8)


def test_inject_says_why_nothing_matched():
    model = WithOddLayers()
    with pytest.raises(ValueError, match=r"attn\.out_proj is a NonDynamicallyQuantizableLinear, "
                                         r"a subclass of nn\.Linear"):
        polykern.inject_adapters(model, ["out_proj"])
    with pytest.raises(ValueError, match=r"conv is a Conv1d"):
        polykern.inject_adapters(model, ["conv"])
    with pytest.raises(ValueError, match=r"regex matched against the full name.*\['q'\]"):
        polykern.inject_adapters(tiny_model(), "q")
    with pytest.raises(ValueError, match=r"end in 'q_proj'.*\['q_proj'\]"):
        polykern.inject_adapters(tiny_model(), "q_proj")
    polykern.inject_adapters(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"q_proj is already adapted \(a PeraLinear\)"):
        polykern.inject_adapters(model, ["q_proj"], method="genlora", r=2)
    assert all(type(m) is not PeraLinear for n, m in model.named_modules() if n != "q_proj")


def tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2Model(cfg).eval()


@pytest.mark.parametrize("method", ["pera", "genlora"])
def test_gpt2_conv1d_inject_train_save_merge_and_unload(tmp_path, method):
    """GPT-2's linears are transformers' Conv1D (weight (in, out)): adapted as peft adapts them,
    trained, saved and loaded into a fresh model, and merged back into Conv1D layers."""
    from transformers.pytorch_utils import Conv1D
    model = tiny_gpt2()
    names = polykern.inject_adapters(model, ["c_attn", "mlp.c_fc"], method=method, r=4)
    assert names == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    perturb_adapters(model)
    ids = torch.randint(0, 50, (3, 9))
    out = model(input_ids=ids).last_hidden_state
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * len(model.get_submodule(names[0]).adapter_parameter_names)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
               for g in grads.values())
    path = str(tmp_path / "gpt2.safetensors")
    polykern.save_adapters(model, path)
    fresh = tiny_gpt2()
    polykern.load_adapters(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, out)
        merged = polykern.merge_and_unload(model)
        assert not polykern.models.adapter_modules(merged)
        assert all(type(merged.get_submodule(n)) is Conv1D for n in names)
        assert merged.get_submodule(names[0]).weight.shape == (32, 96)
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, out, rtol=1e-4,
                                   atol=1e-5)
