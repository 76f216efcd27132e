"""``polykern.export_lora`` / ``python -m polykern export-lora``: PERA and GenLoRA adapters written
as a standard peft LoRA adapter, which plain peft (a subprocess that never imports polykern) loads
onto the same base model and which then gives polykern's outputs (fp32, within 1e-5)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import polykern
from polykern.__main__ import main as polykern_main
from polykern.models import adapter_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pk_peft = pytest.importorskip("polykern.peft")

VOCAB, SEQ, BATCH = 64, 9, 3
ATOL = 1e-5

# Runs in a fresh interpreter with no polykern on its path: base model from its saved folder,
# adapter through PeftModel.from_pretrained, outputs written for the test to compare.
PLAIN_PEFT = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModel
    jobs = json.load(open(sys.argv[1]))
    ids = torch.load(sys.argv[2])
    for job in jobs:
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(job["base"]), job["adapter"])
        model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).last_hidden_state, job["out"])
    assert not any(m.split(".")[0] == "polykern" for m in sys.modules), "polykern was imported"
""")


def bert_base():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def gpt2_base():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                  n_positions=16)
    return transformers.GPT2Model(cfg).eval()


BASES = {"bert": bert_base, "gpt2": gpt2_base}
BERT_MLP = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"


@torch.no_grad()
def perturb(model, seed=1):
    """Non-zero adapters (the default init has B = 0, so Delta W would be zero)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [p for _, m in adapter_modules(model) for p in m.adapter_parameters()]
    tensors += [p for _, m in pk_peft.polykern_layers(model) for a in m.polykern_config
                for p in m.adapter_tensors(a)]
    assert tensors
    for p in tensors:
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def injected(base, *injections):
    model = copy.deepcopy(base)
    for targets, method, cfg in injections:
        polykern.inject_adapters(model, targets, method=method, **cfg)
    perturb(model)
    return model.eval()


def bridged(base, method, options, **lora):
    config = peft.LoraConfig(**lora)
    pk_peft.register(config, method=method, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    return model.eval()


# name -> (base, builder of the adapted model, expected r in adapter_config.json)
CASES = {
    "pera_full_r16": ("bert", lambda b: injected(b, (["query", "value"], "pera",
                                                    dict(r=16, alpha=32))), 152),
    "pera_square": ("bert", lambda b: injected(b, (["query", "key", "value"], "pera",
                                                  dict(r=4, alpha=8, terms="square"))), 8),
    "genlora": ("bert", lambda b: injected(b, (BERT_MLP, "genlora",
                                              dict(r=4, alpha=2, num_rbf=6, latent_dim=2))), 4),
    "mixed_ranks": ("bert", lambda b: injected(
        b, (["query", "value"], "pera", dict(r=4, alpha=8)),
        (BERT_MLP, "genlora", dict(r=3, num_rbf=6))), 14),
    "gpt2_conv1d": ("gpt2", lambda b: injected(b, (["c_attn", "c_fc"], "pera",
                                                  dict(r=3, alpha=6))), 9),
    "peft_pera": ("bert", lambda b: bridged(b, "pera", {"terms": "full"}, r=4, lora_alpha=8,
                                            use_rslora=True, rank_pattern={"value": 2},
                                            target_modules=["query", "value"]), 14),
    "peft_genlora": ("bert", lambda b: bridged(b, "genlora", {"num_rbf": 6}, r=4, lora_alpha=6,
                                               target_modules=["intermediate.dense"]), 4),
}
CLI_CASES = {"cli_mixed_ranks": "mixed_ranks", "cli_gpt2_conv1d": "gpt2_conv1d"}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Export every case, load all of them in one plain-peft subprocess; per case the polykern
    model's output, the base output, plain peft's output and the config written."""
    tmp = tmp_path_factory.mktemp("export")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp / "ids.pt")
    bases = {}
    for kind, build in BASES.items():
        bases[kind] = build()
        bases[kind].save_pretrained(tmp / f"base_{kind}")
    results, jobs = {}, []

    def add(name, kind, model, export):
        adapter = tmp / name
        config = export(adapter)
        with torch.no_grad():
            ours = model(input_ids=ids).last_hidden_state
            base = bases[kind](input_ids=ids).last_hidden_state
        results[name] = {"ours": ours, "base": base, "config": config}
        jobs.append({"base": str(tmp / f"base_{kind}"), "adapter": str(adapter),
                     "out": str(tmp / f"{name}.pt")})

    models = {}
    for name, (kind, build, _) in CASES.items():
        models[name] = build(bases[kind])
        add(name, kind, models[name], lambda d, m=models[name]: polykern.export_lora(m, str(d)))
    for name, source in CLI_CASES.items():
        kind = CASES[source][0]
        path = tmp / f"{name}.safetensors"
        polykern.save_adapters(models[source], str(path))
        argv = ["export-lora", str(path), None] + (["--fan-in-fan-out"] if kind == "gpt2" else [])

        def export(d, argv=argv):
            argv[2] = str(d)
            assert polykern_main(argv) == 0
            return json.loads((d / "adapter_config.json").read_text())
        add(name, kind, models[source], export)

    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "plain_peft.py").write_text(PLAIN_PEFT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(tmp / "plain_peft.py"), str(tmp / "jobs.json"),
                           str(tmp / "ids.pt")], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, job in zip(results, jobs):
        results[name]["peft"] = torch.load(job["out"])
    return results


@pytest.mark.parametrize("name", list(CASES) + list(CLI_CASES))
def test_plain_peft_reproduces_polykern(round_trip, name):
    """Plain peft's output with the export equals polykern's (fp32, 1e-5), and the adapters
    change the output by far more than that (a missing or zero adapter would fail)."""
    res = round_trip[name]
    effect = (res["ours"] - res["base"]).abs().max().item()
    assert effect > 1e-3, f"{name}: the adapters barely change the output ({effect:.2e})"
    diff = (res["peft"] - res["ours"]).abs().max().item()
    print(f"{name}: max |peft - polykern| = {diff:.2e}, adapter effect {effect:.2e}")
    assert diff <= ATOL, f"{name}: plain peft differs from polykern by {diff:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_config_rank_and_patterns(round_trip, name):
    """``r`` is the largest generated width R (152 for PERA full r=16); a layer of another R has
    a ``rank_pattern`` entry and ``lora_alpha`` equals the rank everywhere (scaling 1)."""
    config, r = round_trip[name]["config"], CASES[name][2]
    assert config["peft_type"] == "LORA"
    assert config["r"] == r and config["lora_alpha"] == r
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert all(R < r for R in config["rank_pattern"].values())
    assert config["fan_in_fan_out"] == (CASES[name][0] == "gpt2")


def test_mixed_ranks_pattern_names_the_smaller_layers(round_trip):
    config = round_trip["mixed_ranks"]["config"]
    assert config["rank_pattern"] == {f"encoder.layer.{i}.{n}.dense": 3
                                      for i in range(2) for n in ("intermediate", "output")}
    assert len(config["target_modules"]) == 8


def test_peft_bridge_export_uses_base_model_names(round_trip):
    config = round_trip["peft_pera"]["config"]
    assert config["target_modules"] == [f"encoder.layer.{i}.attention.self.{n}"
                                        for i in range(2) for n in ("query", "value")]
    # rank_pattern {"value": 2} gives those layers R = 2 + 3 = 5
    assert set(config["rank_pattern"].values()) == {5}


def test_export_tensors_layout_and_dtype(tmp_path):
    """peft's key layout, shapes ``lora_A (R, in)`` / ``lora_B (out, R)``, and ``dtype`` casting;
    ``lora_B @ lora_A`` is the layer's ``delta_weight()``."""
    from safetensors.torch import load_file
    model = injected(bert_base(), (["query"], "pera", dict(r=3, alpha=5)))
    polykern.export_lora(model, str(tmp_path), dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    name = "encoder.layer.0.attention.self.query"
    A = tensors[f"base_model.model.{name}.lora_A.weight"]
    B = tensors[f"base_model.model.{name}.lora_B.weight"]
    assert A.dtype == B.dtype == torch.bfloat16
    assert A.shape == (9, 32) and B.shape == (32, 9)
    want = model.get_submodule(name).delta_weight()
    torch.testing.assert_close((B.float() @ A.float()), want, rtol=0.05, atol=2e-3)


def test_export_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="no polykern adapter layers"):
        polykern.export_lora(bert_base(), str(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists()


def test_cli_refuses_a_file_not_from_save_adapters(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by polykern.save_adapters"):
        polykern_main(["export-lora", str(tmp_path / "other.safetensors"), str(tmp_path / "o")])


def test_cli_info_and_selftest_still_dispatch(capsys):
    assert polykern_main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info, dict) and info
    with pytest.raises(SystemExit) as exit_:      # selftest's own parser answers --help
        polykern_main(["selftest", "--help"])
    assert exit_.value.code == 0 and "selftest" in capsys.readouterr().out


def test_export_refuses_peft_own_lora_layers_in_a_bridge_model(tmp_path):
    """A bridge target that is not an nn.Linear gets peft's own LoRA, which is not exported:
    refused rather than silently left out."""
    model = bridged(bert_base(), "pera", {"terms": "full"}, r=2,
                    target_modules=["query", "word_embeddings"])
    with pytest.raises(NotImplementedError, match="word_embeddings"):
        polykern.export_lora(model, str(tmp_path))
