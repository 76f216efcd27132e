"""The peft bridge (``polykern.peft``): peft's ``get_peft_model`` builds PERA/GenLoRA layers that
train, merge, save and load as polykern's own layers do, and peft's generic code (adapter switching,
enable/disable, device and dtype moves) works on them."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
pk_peft = pytest.importorskip("polykern.peft")

import polykern  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_models import perturb_adapters, tiny_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "mlp.2"]
METHODS = [("pera", {"terms": "full"}), ("genlora", {"num_rbf": 6, "latent_dim": 2}),
           ("lora", {})]


def peft_model(method, opts, seed=5, dropout=0.0, **lora):
    cfg = LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=TARGETS, **lora)
    pk_peft.register(cfg, method=method, **opts)
    model = tiny_model()
    torch.manual_seed(seed)
    return get_peft_model(model, cfg)


def native_model(method, opts, seed=5, dropout=0.0):
    model = tiny_model()
    torch.manual_seed(seed)
    polykern.inject_adapters(model, TARGETS, method=method, r=3, alpha=6, dropout=dropout, **opts)
    return model


def pairs(pm, native):
    """(peft layer, polykern layer) pairs in model order."""
    layers = pk_peft.polykern_layers(pm)
    natives = polykern.models.adapter_modules(native)
    assert [n.removeprefix("base_model.model.") for n, _ in layers] == [n for n, _ in natives]
    return [(a, b) for (_, a), (_, b) in zip(layers, natives)]


@torch.no_grad()
def copy_native_into_peft(pm, native, adapter="default"):
    for layer, ref in pairs(pm, native):
        for mine, theirs in zip(layer.adapter_tensors(adapter), ref.adapter_parameters()):
            mine.copy_(theirs)


@pytest.mark.parametrize("method,opts", METHODS)
def test_trains_exactly_as_polykern_layers(method, opts):
    """Same seed: same initial adapters as inject_adapters; same steps (adapter dropout on): the
    same losses and parameters, bit for bit; the trainable set is the adapters only."""
    pm = peft_model(method, opts, dropout=0.1)
    native = native_model(method, opts, dropout=0.1)
    for layer, ref in pairs(pm, native):
        assert all(torch.equal(a, b) for a, b in zip(layer.adapter_tensors("default"),
                                                      ref.adapter_parameters()))
        assert layer.polykern_config["default"] == ref.adapter_config()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    names = pk_peft.PEFT_NAMES["genlora" if method == "genlora" else "pera"].values()
    assert trainable and all(n.split(".")[-2] in names for n in trainable)
    assert polykern.count_parameters(pm) == polykern.count_parameters(native)

    x, target = torch.randn(6, 5, 24), torch.randn(6, 5, 5)
    losses = []
    for model in (pm, native):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(11)    # the dropout masks
        run = []
        for _ in range(3):
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]
    for layer, ref in pairs(pm, native):
        assert all(torch.equal(a, b) for a, b in zip(layer.adapter_tensors("default"),
                                                      ref.adapter_parameters()))


@pytest.mark.parametrize("method,opts", METHODS[:2])
def test_merge_unmerge_and_merge_and_unload(method, opts):
    """peft's merge contract (testing_common._test_merge_layers): unmerged, merged, unmerged again
    and merge_and_unload agree; the merged weights are polykern.merge_and_unload's, bit for bit.
    """
    native = native_model(method, opts)
    perturb_adapters(native)
    pm = peft_model(method, opts)
    copy_native_into_peft(pm, native)
    pm.eval()
    x = torch.randn(4, 7, 24)
    with torch.no_grad():
        y = pm(x)
        assert torch.equal(y, native(x))
        pm.merge_adapter()
        assert all(layer.merged for layer, _ in pairs(pm, native))
        torch.testing.assert_close(pm(x), y, rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(x), y, rtol=1e-5, atol=1e-5)
        merged = pm.merge_and_unload()
        assert not pk_peft.polykern_layers(merged)
        ref = polykern.merge_and_unload(native)
        for (n, a), (_, b) in zip(merged.named_parameters(), ref.named_parameters()):
            assert torch.equal(a, b), n
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_and_safe_merge_checks():
    pm = peft_model("pera", {"terms": "square"})
    layer = pk_peft.polykern_layers(pm)[0][1]
    W = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.lora_pera_B["default"].fill_(1.0)
        layer.lora_pera_h["default"].fill_(float("inf"))
    for safe in (False, True):
        with pytest.raises(ValueError, match="NaN or inf"):
            layer.merge(safe_merge=safe)
        assert torch.equal(layer.get_base_layer().weight, W) and not layer.merged
    with torch.no_grad():
        layer.lora_pera_h["default"].fill_(0.5)
    layer.merge(safe_merge=True)
    assert layer.merged
    delta = layer.get_delta_weight("default")
    assert delta.shape == W.shape and not delta.requires_grad
    torch.testing.assert_close(layer.get_base_layer().weight, W + delta)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, W, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,opts", METHODS[:2])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, method, opts):
    """save_pretrained writes only adapter tensors (polykern's, under peft's keys); loading with
    the registration repeated gives the same tensors and outputs, bit for bit."""
    native = native_model(method, opts)
    perturb_adapters(native)
    pm = peft_model(method, opts)
    copy_native_into_peft(pm, native)
    pm.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    n_params = len(polykern.adapter_state_dict(native))
    assert len(saved) == n_params
    assert all(".base_layer." not in k and k.split(".")[-1].startswith("lora_") for k in saved)

    cfg = LoraConfig.from_pretrained(str(tmp_path))
    pk_peft.register(cfg, method=method, **opts)
    loaded = PeftModel.from_pretrained(tiny_model(seed=0), str(tmp_path), config=cfg)
    x = torch.randn(3, 24)
    pm.eval()
    assert torch.equal(loaded(x), pm(x))
    for (_, a), (_, b) in zip(pk_peft.polykern_layers(loaded), pk_peft.polykern_layers(pm)):
        assert a.polykern_config == b.polykern_config
        assert all(torch.equal(u, v) for u, v in zip(a.adapter_tensors("default"),
                                                      b.adapter_tensors("default")))
    if pk_peft._version_tuple(peft.__version__) >= (0, 19):
        # A second saved adapter into the same model: add it registered, then load its weights.
        second = pk_peft.register(LoraConfig.from_pretrained(str(tmp_path)), method=method,
                                  **opts)
        loaded.add_adapter("second", second)
        loaded.load_adapter(str(tmp_path), adapter_name="second")
        loaded.set_adapter("second")
        assert torch.equal(loaded(x), pm(x))
    # Registered with other shapes than those saved: loading fails loudly.
    wrong = LoraConfig.from_pretrained(str(tmp_path))
    pk_peft.register(wrong, method=method, **({"terms": "square"} if method == "pera"
                                               else {"num_rbf": 5}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_model(seed=0), str(tmp_path), config=wrong)


def test_generic_peft_code_adapters_enable_disable_moves(tmp_path):
    """Two adapters of different methods on the same layers; set_adapter, disable_adapter,
    delete_adapter and dtype moves through peft's own code."""
    pm = peft_model("pera", {"terms": "cross"})
    other = LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS)
    pk_peft.register(other, method="genlora", num_rbf=4)
    if pk_peft._version_tuple(peft.__version__) < (0, 19):
        # peft 0.17/0.18 do not pass the new adapter's LoraConfig to an existing layer
        with pytest.raises(NotImplementedError, match="needs peft >= 0.19"):
            pm.add_adapter("other", other)
        return
    pm.add_adapter("other", other)
    layer = pk_peft.polykern_layers(pm)[0][1]
    assert set(layer.polykern_config) == {"default", "other"}
    assert layer.polykern_config["other"]["method"] == "genlora"
    with torch.no_grad():     # make both adapters act
        for adapter in ("default", "other"):
            for _, lyr in pk_peft.polykern_layers(pm):
                for p in lyr.adapter_tensors(adapter):
                    p.add_(0.1 * torch.randn_like(p))
    base = tiny_model(seed=0).eval()
    pm.eval()
    x = torch.randn(5, 24)
    with torch.no_grad():
        y_default = pm(x)
        pm.set_adapter("other")
        y_other = pm(x)
        assert not torch.allclose(y_default, y_other)
        trainable = {n.split(".")[-1] for n, p in pm.named_parameters() if p.requires_grad}
        assert trainable == {"other"}
        with pm.disable_adapter():
            assert torch.equal(pm(x), base(x))
        assert torch.equal(pm(x), y_other)
        # both active at once: the second adapter's term adds to the first's fused call
        pm.base_model.set_adapter(["default", "other"])
        both = pm(x)
        for _, lyr in pk_peft.polykern_layers(pm):
            lyr.merge()                                  # merges the active adapters
            assert lyr.merged_adapters == ["default", "other"]
        torch.testing.assert_close(pm(x), both, rtol=1e-5, atol=1e-5)
        for _, lyr in pk_peft.polykern_layers(pm):
            lyr.unmerge()
        pm.base_model.set_adapter("default")
        pm.delete_adapter("other")
        assert set(layer.polykern_config) == {"default"}
        # merge then unmerge gives the weight back to rounding
        torch.testing.assert_close(pm(x), y_default, rtol=1e-5, atol=1e-6)
        pm.to(torch.float64)
        assert layer.lora_pera_A["default"].dtype == torch.float64
        torch.testing.assert_close(pm(x.double()), y_default.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="plain LoRA cannot share"):
        pm.add_adapter("plain", LoraConfig(r=2, target_modules=TARGETS))


def test_bf16_base_gets_fp32_adapters_and_runs():
    """peft's autocast_adapter_dtype upcasts the adapters of a bf16 model to fp32; the math then
    runs as polykern's mixed precision (fp32 generator, bf16 matmuls)."""
    model = tiny_model().to(torch.bfloat16)
    cfg = pk_peft.register(LoraConfig(r=3, target_modules=TARGETS), method="genlora", num_rbf=4)
    pm = get_peft_model(model, cfg)
    layer = pk_peft.polykern_layers(pm)[0][1]
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in layer.adapter_tensors("default"))
    y = pm(torch.randn(2, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in layer.adapter_tensors("default"))


def test_register_and_options_errors():
    with pytest.raises(TypeError, match="LoraConfig"):
        pk_peft.register({"r": 2})
    with pytest.raises(ValueError, match="unknown adapter method 'dora'"):
        pk_peft.register(LoraConfig(), method="dora")
    with pytest.raises(ValueError, match="unknown PERA terms"):
        pk_peft.register(LoraConfig(), method="pera", terms="cubic")
    with pytest.raises(ValueError, match="num_rbf must be positive"):
        pk_peft.register(LoraConfig(), method="genlora", num_rbf=0)
    with pytest.raises(TypeError, match="'r' is not a polykern option"):
        pk_peft.register(LoraConfig(), method="pera", r=4)
    with pytest.raises(ValueError, match="terms='none'"):
        pk_peft.register(LoraConfig(), method="lora", terms="full")
    for bad in ({"use_dora": True}, {"init_lora_weights": "gaussian"}):
        cfg = pk_peft.register(LoraConfig(r=2, target_modules=["q_proj"], **bad))
        with pytest.raises(ValueError, match="polykern peft layers"):
            get_peft_model(tiny_model(), cfg)
    pm = peft_model("pera", {})
    with pytest.raises(NotImplementedError, match="adapter_names"):
        pk_peft.polykern_layers(pm)[0][1](torch.randn(2, 24), adapter_names=["default"] * 2)


def test_version_gate(monkeypatch):
    pk_peft.check_peft_version(peft.__version__)        # the installed one passes
    pk_peft.check_peft_version("0.17.1")
    pk_peft.check_peft_version("0.21.9")
    for version in ("0.16.0", "0.22.0", "1.0.0"):
        with pytest.raises(ImportError, match=r"tested with peft>=0\.17,<0\.22"):
            pk_peft.check_peft_version(version)
    with pytest.raises(ImportError, match="_register_custom_module"):
        pk_peft.check_peft_version("0.21.2", has_custom_modules=False)
    monkeypatch.setenv("POLYKERN_PEFT_ALLOW_UNTESTED", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pk_peft.check_peft_version("0.22.0")
    assert any("tested with" in str(w.message) for w in caught)


def test_rank_and_alpha_pattern_and_rslora():
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, use_rslora=True,
                     rank_pattern={"q_proj": 5}, alpha_pattern={"v_proj": 2})
    pm = get_peft_model(tiny_model(), pk_peft.register(cfg, method="pera"))
    q = pm.base_model.model[0].q_proj
    v = pm.base_model.model[0].v_proj
    assert q.lora_pera_A["default"].shape == (5, 24) and q.polykern_config["default"]["r"] == 5
    assert q.scaling["default"] == pytest.approx(6 / 5 ** 0.5)
    assert v.scaling["default"] == pytest.approx(2 / 3 ** 0.5)
    assert isinstance(pm.base_model.model[0].norm, nn.LayerNorm)


@pytest.mark.gpu
@pytest.mark.parametrize("method,opts", METHODS[:2])
def test_bridge_runs_the_kernels_on_gpu(method, opts, monkeypatch):
    """On CUDA inputs the bridge calls polykern's CUDA ops (the reference is never reached) and
    gives what PeraLinear / GenLoraLinear give, forward and backward."""
    if not polykern.cuda_available():
        pytest.skip("needs a CUDA GPU and the compiled extension")
    native = native_model(method, opts)
    perturb_adapters(native)
    pm = peft_model(method, opts)
    copy_native_into_peft(pm, native)
    pm, native = pm.cuda(), native.cuda()

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran on a CUDA input")
    x0 = torch.randn(4, 9, 24, device="cuda")
    outs = []
    for model in (pm, native):
        with monkeypatch.context() as m:
            m.setattr(polykern.reference, "pera_linear", refuse)
            m.setattr(polykern.reference, "genlora_linear", refuse)
            x = x0.clone().requires_grad_(True)
            y = model(x)
            y.square().sum().backward()
        outs.append((y.detach(), x.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
    for layer, ref in pairs(pm, native):
        for a, b in zip(layer.adapter_tensors("default"), ref.adapter_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if polykern.cuda_available() else []))
@pytest.mark.parametrize("method,opts", METHODS[:2])
def test_autocast_with_bias_matches_polykern_layers(method, opts, device):
    """Under autocast the bridge casts input, weight and bias as AdapterLinear.forward does (one
    shared helper), so it computes exactly what the native layers compute."""
    native = native_model(method, opts)
    perturb_adapters(native)
    pm = peft_model(method, opts)
    copy_native_into_peft(pm, native)
    pm, native = pm.to(device), native.to(device)
    x = torch.randn(4, 24, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        a, b = pm(x), native(x)
    assert a.dtype == b.dtype
    assert torch.equal(a, b)


@pytest.mark.parametrize("method,opts", METHODS)
def test_from_pretrained_registers_and_loads_in_one_call(tmp_path, method, opts):
    """save_pretrained writes polykern's method and options beside the adapter; from_pretrained
    reads them, registers and loads: the same layers, tensors and outputs, bit for bit."""
    native = native_model(method, opts)
    perturb_adapters(native)
    pm = peft_model(method, opts)
    copy_native_into_peft(pm, native)
    pm.save_pretrained(str(tmp_path))
    spec = json.loads((tmp_path / pk_peft.SPEC_FILE).read_text())
    expected = ("genlora", opts) if method == "genlora" else ("pera", {"terms": "none"}
                                                               if method == "lora" else opts)
    assert (spec["method"], spec["options"]) == expected
    loaded = pk_peft.from_pretrained(tiny_model(seed=0), str(tmp_path))
    assert isinstance(loaded, PeftModel)
    layers = pk_peft.polykern_layers(loaded)
    assert [n for n, _ in layers] == [n for n, _ in pk_peft.polykern_layers(pm)]
    for (_, a), (_, b) in zip(layers, pk_peft.polykern_layers(pm)):
        assert a.polykern_config == b.polykern_config
        assert all(torch.equal(u, v) for u, v in zip(a.adapter_tensors("default"),
                                                      b.adapter_tensors("default")))
    x = torch.randn(3, 24)
    pm.eval()
    assert torch.equal(loaded(x), pm(x))
    assert not any(p.requires_grad for p in loaded.parameters())     # peft's default: inference
    trainable = pk_peft.from_pretrained(tiny_model(seed=0), str(tmp_path), is_trainable=True)
    assert polykern.count_parameters(trainable) == polykern.count_parameters(pm)


def test_from_pretrained_refuses_an_adapter_saved_without_polykern(tmp_path):
    plain = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=TARGETS))
    plain.save_pretrained(str(tmp_path))
    assert not (tmp_path / pk_peft.SPEC_FILE).exists()
    with pytest.raises(FileNotFoundError, match="register"):
        pk_peft.from_pretrained(tiny_model(), str(tmp_path))
