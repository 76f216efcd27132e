"""``transformers.Trainer`` over polykern adapters (``inject_adapters`` and the peft bridge) on the
CPU: a run interrupted at a checkpoint and resumed from it gives the uninterrupted run's loss curve
and adapters, activation checkpointing switched on through ``TrainingArguments`` gives the plain
run's numbers, and the final adapters save and load."""

import pytest
import torch

import polykern
from polykern.models import adapter_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pk_peft = pytest.importorskip("polykern.peft")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

VOCAB, LABELS, STEPS, CHECKPOINT_STEP = 64, 3, 6, 3
# transformers 5 renamed TrainingArguments' gradient_checkpointing to activation_checkpointing.
CHECKPOINTING = next(n for n in ("activation_checkpointing", "gradient_checkpointing")
                     if n in TrainingArguments.__dataclass_fields__)
BERT_MLP = r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"


def base_model():
    """A seeded two-layer BERT classifier (dropout on, so resuming must restore the RNG)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16, num_labels=LABELS)
    return transformers.BertForSequenceClassification(cfg)


@torch.no_grad()
def perturb(model, seed):
    """Move every trainable tensor off its init (B = 0 would leave A and h without gradient);
    another ``seed`` gives a model whose state a checkpoint must overwrite."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def injected(seed=1):
    """PERA in attention, GenLoRA in the MLP, adapter dropout on; the classifier stays frozen."""
    model = base_model()
    polykern.inject_adapters(model, ["query", "value"], method="pera", r=4, alpha=8, dropout=0.1)
    polykern.inject_adapters(model, BERT_MLP, method="genlora", r=4, num_rbf=6, dropout=0.1)
    return perturb(model, seed)


def bridged(seed=1):
    """The peft bridge: PERA in attention, peft training and saving the classifier too."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    pk_peft.register(config, method="pera", terms="full")
    return perturb(peft.get_peft_model(base_model(), config), seed)


BUILDERS = {"inject_adapters": injected, "peft_bridge": bridged}


class Sentences(torch.utils.data.Dataset):
    """32 random token sequences labelled by their first token."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (32, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % LABELS}


def arguments(output_dir, **overrides):
    kw = dict(max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=1,
              save_steps=CHECKPOINT_STEP, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
              dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(str(output_dir), **kw)


def loss_curve(trainer):
    """``{step: loss}`` from the trainer's log (every step: ``logging_steps=1``)."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StopAt(TrainerCallback):
    """Interrupt training after ``step`` (its checkpoint is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("via", list(BUILDERS))
def test_resume_from_checkpoint_gives_the_uninterrupted_curve(tmp_path, via):
    """An interrupted run, resumed from its checkpoint in a fresh process-like setting (a new
    model with other adapter values, a new Trainer), logs the uninterrupted run's losses step for
    step and ends with its parameters: bit for bit, as both runs do the same CPU arithmetic."""
    build = BUILDERS[via]
    whole = Trainer(model=build(), args=arguments(tmp_path / "whole"), train_dataset=Sentences())
    whole.train()
    want = loss_curve(whole)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert len(set(want.values())) > 1, "the loss never moved"

    first = Trainer(model=build(), args=arguments(tmp_path / "cut"), train_dataset=Sentences(),
                    callbacks=[StopAt(CHECKPOINT_STEP)])
    first.train()
    assert first.state.global_step == CHECKPOINT_STEP
    checkpoint = tmp_path / "cut" / f"checkpoint-{CHECKPOINT_STEP}"
    assert checkpoint.is_dir()

    fresh = build(seed=2)          # other values: the checkpoint must overwrite them
    resumed = Trainer(model=fresh, args=arguments(tmp_path / "cut"), train_dataset=Sentences())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = loss_curve(resumed)
    assert got == want, f"resumed {got} != uninterrupted {want}"
    ends = trainable(whole.model), trainable(fresh)
    assert ends[0].keys() == ends[1].keys()
    for name in ends[0]:
        assert torch.equal(ends[0][name], ends[1][name]), name


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("via", list(BUILDERS))
def test_activation_checkpointing_from_training_arguments(tmp_path, via, use_reentrant):
    """``TrainingArguments(activation_checkpointing=True)`` (``gradient_checkpointing`` before
    transformers 5) recomputes the adapted layers (each runs twice a step) and trains to the
    plain run's losses and parameters, with the reentrant checkpoint too (transformers makes
    the frozen embeddings' output require grad, so the first block's adapters get theirs)."""
    runs = {}
    for checkpointing in (False, True):
        model = BUILDERS[via]()
        calls = []
        layer = model.get_submodule(_first_adapted(model))
        handle = layer.register_forward_hook(lambda *_: calls.append(1))
        options = {CHECKPOINTING: checkpointing,
                   f"{CHECKPOINTING}_kwargs": {"use_reentrant": use_reentrant}}
        trainer = Trainer(model=model, args=arguments(tmp_path / str(checkpointing), max_steps=2,
                                                      **options),
                          train_dataset=Sentences())
        trainer.train()
        handle.remove()
        runs[checkpointing] = (loss_curve(trainer), trainable(model), len(calls))
    assert runs[False][2] == 2 and runs[True][2] == 4, "checkpointing did not recompute"
    assert runs[True][0] == runs[False][0]
    for name, value in runs[False][1].items():
        assert torch.equal(runs[True][1][name], value), name


def _first_adapted(model):
    layers = [n for n, _ in adapter_modules(model)] + [n for n, _ in pk_peft.polykern_layers(model)]
    return layers[0]


@pytest.mark.parametrize("via", list(BUILDERS))
def test_final_adapters_save_and_load(tmp_path, via):
    """After ``trainer.train()``: ``save_adapters`` / ``load_adapters`` (inject_adapters) or
    ``trainer.save_model`` / ``polykern.peft.from_pretrained`` (the bridge) rebuild on a fresh
    base model the trained model's outputs bit for bit."""
    model = BUILDERS[via]()
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", save_strategy="no"),
                      train_dataset=Sentences())
    trainer.train()
    if via == "inject_adapters":
        polykern.save_adapters(model, str(tmp_path / "adapters.safetensors"))
        loaded = base_model()
        polykern.load_adapters(loaded, str(tmp_path / "adapters.safetensors"))
    else:
        trainer.save_model(str(tmp_path / "final"))
        loaded = pk_peft.from_pretrained(base_model(), str(tmp_path / "final"))
    ids = Sentences().ids[:8]
    model.eval(), loaded.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        plain = base_model().eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3, "the adapters do not change the output"
    assert torch.equal(got, want)
