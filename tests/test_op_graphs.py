"""Op graphs (csrc/adapter_core.cpp, version 11): the CUDA ops replay their GPU work as cached CUDA
graphs when a call's inputs sit where an earlier call's did. These tests check that replays give
the plain path's results bit for bit while the inputs' contents change in place, that outputs a
caller still holds are never overwritten by a later replay, that training loops (parameters
updated in place, gradients kept or dropped) match the plain path, and the switch, the budget
and the statistics. Skipped without a GPU and the extension."""

import contextlib

import pytest
import torch

import polykern
from polykern import GenLoraLinear, PeraLinear, ops

pytestmark = pytest.mark.skipif(not polykern.cuda_available(),
                                reason="needs a CUDA GPU and the compiled extension")
DEV = "cuda"


@contextlib.contextmanager
def op_graphs(enabled, budget_mb=None):
    """Op graphs on or off (and a budget), with a cache emptied before and after. Yields a
    function that returns the statistics, replays and captures counted from the start."""
    ops.clear_op_graphs()
    old_budget = torch.ops.polykern._set_op_graph_budget(1024)
    old = ops.set_op_graphs(enabled, budget_mb if budget_mb is not None else 1024)
    start = ops.op_graph_stats()

    def stats():
        now = ops.op_graph_stats()
        return dict(now, replays=now["replays"] - start["replays"],
                    captures=now["captures"] - start["captures"])
    try:
        yield stats
    finally:
        ops.set_op_graphs(old, old_budget)
        ops.clear_op_graphs()


def make_layer(kind, n=48, m=72, r=4, dtype=torch.bfloat16, **cfg):
    torch.manual_seed(11)
    cls = PeraLinear if kind == "pera" else GenLoraLinear
    layer = cls(n, m, r=r, device=DEV, dtype=torch.float32, **cfg)
    with torch.no_grad():  # non-zero adapters (lora init leaves B and h at zero)
        for p in layer.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer.to(dtype)


def train_step(layer, x_buf, gy_buf, x_new, gy_new):
    """One step on fixed input buffers whose contents change in place: returns copies of y,
    grad x and the adapter gradients."""
    for p in layer.adapter_parameters():
        p.grad = None
    x_buf.detach().copy_(x_new)
    gy_buf.copy_(gy_new)
    x_buf.grad = None
    y = layer(x_buf)
    y.backward(gy_buf)
    return ([y.detach().clone(), x_buf.grad.clone()]
            + [p.grad.clone() for p in layer.adapter_parameters()])


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("policy", ["always", "never"])
def test_replays_match_the_plain_path_bit_for_bit(kind, policy):
    """Steps on the same buffers with new contents each time: with op graphs the second call
    is captured and the later ones replayed, and every step's y, grad x and adapter gradients
    equal the plain path's for the same contents, bit for bit, on both adapter paths."""
    layer = make_layer(kind)
    steps = 6
    xs = [torch.randn(3, 37, 48, device=DEV, dtype=torch.bfloat16) for _ in range(steps)]
    gys = [torch.randn(3, 37, 72, device=DEV, dtype=torch.bfloat16) for _ in range(steps)]
    x_buf = torch.empty(3, 37, 48, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy_buf = torch.empty(3, 37, 72, device=DEV, dtype=torch.bfloat16)
    results = {}
    with ops.merge_policy(policy, keep="always"):
        for enabled in (False, True):
            with op_graphs(enabled) as counts:
                results[enabled] = [train_step(layer, x_buf, gy_buf, xs[i], gys[i])
                                    for i in range(steps)]
                stats = counts()
            if enabled:  # forward and backward: captured on the second step, then replayed
                assert stats["captures"] >= 2 and stats["replays"] >= 2 * (steps - 2), stats
                assert stats["bytes"] > 0
            else:
                assert stats["captures"] == 0, stats
    for plain, graphed in zip(results[False], results[True]):
        for a, b in zip(plain, graphed):
            assert torch.isfinite(a).all() and torch.equal(a, b)
    for a, b in zip(results[True][-1], results[True][-2]):  # the contents did change
        assert not torch.equal(a, b)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_held_outputs_are_never_overwritten(kind):
    """A caller that keeps every output while calling again on the same buffers: a replay
    would write into the outputs it handed out before, so the cache makes a second graph and
    then runs the plain path; each kept output still equals what the plain path gives for its
    own inputs. Forward-only (no_grad, the inference op) and the training op's forward."""
    layer = make_layer(kind).eval()
    x_buf = torch.empty(5, 48, device=DEV, dtype=torch.bfloat16)
    xs = [torch.randn(5, 48, device=DEV, dtype=torch.bfloat16) for _ in range(5)]
    with op_graphs(False):
        with torch.no_grad():
            want = [layer(x).clone() for x in xs]
    with op_graphs(True) as counts:
        kept = []
        with torch.no_grad():
            for x in xs:
                x_buf.copy_(x)
                kept.append(layer(x_buf))
        for k, w in zip(kept, want):
            assert torch.equal(k, w)
        assert ops.op_graph_stats()["graphs"] <= 2
        # dropping the outputs frees the graphs' slots: replays resume
        del kept
        before = counts()["replays"]
        with torch.no_grad():
            for x, w in zip(xs, want):
                x_buf.copy_(x)
                assert torch.equal(layer(x_buf), w)
        assert counts()["replays"] >= before + len(xs)
    # the training forward: y, U and the factors stay held by the autograd graphs
    layer.train()
    xg = torch.empty(5, 48, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with op_graphs(False):
        want = [layer(x.requires_grad_()).detach().clone() for x in xs]
    with op_graphs(True):
        ys = []
        for x in xs:
            xg.detach().copy_(x)
            ys.append(layer(xg))
        for y, w in zip(ys, want):
            assert torch.equal(y.detach(), w)
        assert ops.op_graph_stats()["graphs"] <= 2


def test_a_resized_output_is_not_replayed_into():
    """A caller that resizes a returned output in place moves its storage to new memory,
    which the graph would not write: that slot is never replayed again, and later calls still
    give the plain path's results."""
    layer = make_layer("pera").eval()
    x_buf = torch.empty(6, 48, device=DEV, dtype=torch.bfloat16)
    xs = [torch.randn(6, 48, device=DEV, dtype=torch.bfloat16) for _ in range(4)]
    with op_graphs(False), torch.no_grad():
        want = [layer(x).clone() for x in xs]
    with op_graphs(True) as counts, torch.no_grad():
        for x in xs[:2]:  # plain, then captured
            x_buf.copy_(x)
            y = layer(x_buf)
        assert counts()["captures"] == 1
        y.resize_(4096)   # more than the storage had: new memory for the slot's storage
        del y
        for x, w in zip(xs, want):
            x_buf.copy_(x)
            assert torch.equal(layer(x_buf), w)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_loop_matches_the_plain_path(kind, set_to_none):
    """AdamW steps (parameters updated in place, so the graphs read new values each time),
    with gradients dropped or zeroed in place between steps (then the last step's gradients are
    still held when the next backward runs): the parameters after 8 steps equal the plain
    path's bit for bit."""
    finals = {}
    for enabled in (False, True):
        layer = make_layer(kind, dropout=0.0)
        opt = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2)
        x = torch.randn(64, 48, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(64, 72, device=DEV, dtype=torch.bfloat16)
        with op_graphs(enabled) as counts:
            for _ in range(8):
                layer(x).backward(gy)
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)
                x.grad = None
            assert (counts()["replays"] > 0) == enabled
        finals[enabled] = [p.detach().clone() for p in layer.adapter_parameters()]
    for a, b in zip(finals[False], finals[True]):
        assert torch.equal(a, b)


def test_a_toggled_math_mode_is_a_new_key():
    """fp32 with TF32 off, then on, then off again on the same buffers: each call gives what
    the plain path gives under the mode of that moment (a graph captured under one mode is not
    replayed under another)."""
    layer = make_layer("pera", dtype=torch.float32).eval()
    x_buf = torch.randn(300, 48, device=DEV)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        want = {}
        with op_graphs(False), torch.no_grad():
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                want[tf32] = layer(x_buf).clone()
        assert not torch.equal(want[False], want[True])  # the mode shows in the result
        with op_graphs(True) as counts, torch.no_grad():
            for tf32 in (False, False, False, True, True, True, False, False):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                assert torch.equal(layer(x_buf), want[tf32]), f"tf32={tf32}"
            assert counts()["captures"] == 2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_switch_budget_and_errors():
    """Off: nothing is captured. A zero budget: nothing is captured either. Bad arguments raise
    errors that name them; clear_op_graphs empties the cache."""
    layer = make_layer("pera").eval()
    x = torch.randn(4, 48, device=DEV, dtype=torch.bfloat16)
    for enabled, budget in ((False, 1024), (True, 0)):
        with op_graphs(enabled, budget), torch.no_grad():
            for _ in range(4):
                layer(x)
            assert ops.op_graph_stats()["graphs"] == 0
    with op_graphs(True), torch.no_grad():
        for _ in range(4):
            layer(x)
        assert ops.op_graph_stats()["graphs"] == 1
        ops.clear_op_graphs()
        assert ops.op_graph_stats()["graphs"] == 0 and ops.op_graph_stats()["bytes"] == 0
    with pytest.raises(ValueError, match="budget_mb"):
        ops.set_op_graphs(True, -1)
    with pytest.raises(TypeError, match="enabled"):
        ops.set_op_graphs("yes")
    with pytest.raises(RuntimeError, match="op graph mode"):
        torch.ops.polykern._set_op_graphs(3)


def test_inside_a_user_capture_the_op_is_captured_as_usual():
    """Under torch.cuda.graph the ops do not use their own graphs: their work becomes part of
    the caller's graph, whose replays then follow the static input's new contents."""
    layer = make_layer("genlora").eval()
    static_x = torch.randn(8, 48, device=DEV, dtype=torch.bfloat16)
    with op_graphs(True) as counts, torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(s)
        before = counts()["captures"]
        assert before == 1  # the warm-up on the side stream: captured on its second call
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = layer(static_x)
        assert counts()["captures"] == before
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        g.replay()
        torch.cuda.synchronize()
        want = layer(new_x.clone())
        assert torch.equal(static_y, want)
