"""DDP and FSDP2 on polykern's engine: ``scripts/train_distributed.py`` under torchrun, 2 processes
on the CPU with gloo, against single-process training on the same global batches; the adapters
gathered from the replicas / shards load into a fresh single-process model."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import polykern

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_distributed.py"
STEPS, GLOBAL_BATCH = 4, 8


def _script():
    spec = importlib.util.spec_from_file_location("train_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # One thread a process: two processes share this machine's cores.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--modes", "ddp,fsdp2", "--steps", str(STEPS),
           "--global-batch", str(GLOBAL_BATCH), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def single():
    td = _script()
    losses, model = td.train("single", STEPS, GLOBAL_BATCH)
    return td, losses, model


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_matches_single_process(torchrun_out, single, mode):
    td, ref_losses, ref_model = single
    run = json.loads((torchrun_out / f"{mode}_run.json").read_text())
    assert run["world_size"] == 2
    # FSDP2 really trained shards; DDP full replicas.
    assert run["param_type"] == ("DTensor" if mode == "fsdp2" else "Tensor")
    # The same global batch: the losses agree to float rounding (the gradient average over two
    # halves sums in another order than the mean over the whole batch).
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses),
                               rtol=1e-5, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0]

    # The gathered adapters load into a fresh, plain, single-process model (load_adapters
    # rebuilds the PERA and GenLoRA layers from the file's metadata).
    fresh = td.build_model(adapters=False)
    names = polykern.load_adapters(fresh, str(torchrun_out / f"{mode}_adapters.safetensors"))
    assert sorted(names) == sorted(n for n, _ in polykern.models.adapter_modules(ref_model))
    got, want = polykern.adapter_state_dict(fresh), polykern.adapter_state_dict(ref_model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-5, msg=k)
    for name, layer in polykern.models.adapter_modules(fresh):
        assert layer.adapter_config() == ref_model.get_submodule(name).adapter_config()
    ids, _ = td.global_batch(99, 3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state,
                                   ref_model(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


def test_report_checks_losses_reload_and_throughput(torchrun_out):
    """The script's --report step (what the 2-GPU run commits): the losses of DDP and FSDP2
    within 2x of what reordering the same math gives (the single-process run with accumulated
    halves), the saved adapters reproducing each run's output after reloading, tokens/s."""
    td = _script()
    for mode in ("single", "single_accum"):
        td.train(mode, STEPS, GLOBAL_BATCH, out=str(torchrun_out))
    res = td.report(str(torchrun_out), "cpu", str(torchrun_out / "report.json"))
    assert json.loads((torchrun_out / "report.json").read_text())["modes"].keys() == \
        {"single", "single_accum", "ddp", "fsdp2"}
    for mode in ("ddp", "fsdp2"):
        entry = res["modes"][mode]
        assert entry["world_size"] == 2
        assert entry["loss_within_bound"], entry
        assert entry["reload_within_rounding"], entry
        assert entry["tokens_per_s_per_gpu"] > 0
    assert res["modes"]["single"]["max_loss_diff_vs_single"] == 0.0


def test_script_refuses_ddp_without_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--modes", "ddp", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "launch with torchrun" in proc.stderr


@pytest.mark.gpu
def test_nccl_on_gpus_matches_single_process(tmp_path):
    """The same script with --device cuda: NCCL, one process a GPU (up to 2), kernels in use."""
    if not polykern.cuda_available():
        pytest.skip("needs a CUDA GPU and the compiled extension")
    nproc = min(torch.cuda.device_count(), 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(SCRIPT), "--device", "cuda", "--modes", "ddp,fsdp2", "--steps",
           str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    td = _script()
    ref_losses, ref_model = td.train("single", STEPS, GLOBAL_BATCH, device="cuda")
    for mode in ("ddp", "fsdp2"):
        run = json.loads((tmp_path / f"{mode}_run.json").read_text())
        assert run["world_size"] == nproc and run["device"].startswith("cuda")
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses),
                                   rtol=1e-4, atol=1e-5)
        fresh = td.build_model(adapters=False)
        polykern.load_adapters(fresh, str(tmp_path / f"{mode}_adapters.safetensors"))
        want = polykern.adapter_state_dict(ref_model)
        for k, v in polykern.adapter_state_dict(fresh).items():
            torch.testing.assert_close(v, want[k].cpu(), rtol=1e-3, atol=1e-4, msg=k)
