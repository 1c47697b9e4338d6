"""One graph: torch.compile(fullgraph=True) of forward and backward, torch.export with dynamic batch and sequence
sizes, an AOTInductor package, and the Trainer's --torch_compile, padded batches (the masked layout) and unpadded.

On CPU the update rule is the chunk backend's custom operators (ops_chunk.py); the Triton one (ops_triton_compile.py)
is checked here under Triton's interpreter and, on CUDA, inside the compiled model. Most cases compile with the
"aot_eager" backend (dynamo's graph and AOTAutograd's forward and backward graphs, run by eager kernels: seconds);
one runs inductor end to end (a minute on 2 CPU cores, marked slow)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch.export import Dim

if __name__ != "__main__":  # (the interpreter worker below imports nothing of the test suite)
    from test_model import ids, tiny_model
    from test_train import MICRO, mini_corpus, run_args, tokenizer_cache, train  # noqa: F401  (fixtures)
    from triton_interpreter import run_cases, worker_results

    pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {  # one per family of layer maths
    "delta_net": {},
    "linear_transformer": dict(update_rule="sum", qk_norm="none", attention_normalization=True),
    "delta_attn_norm_dpfp_sinusoidal": dict(attention_normalization=True, feature_map="dpfp", dpfp_nu=2,
                                            position_embedding="sinusoidal"),
    "favor_sum": dict(update_rule="sum", feature_map="favor", favor_features=6, qk_norm="none",
                      attention_normalization=True),
    "modern": dict(block_style="pre_norm", feature_map="silu", qk_norm="l2", use_short_conv=True,
                   position_embedding="rotary"),
    "fla_gated": dict(block_style="pre_norm", feature_map="identity", qk_norm="l2", use_short_conv=True,
                      use_gate=True, allow_neg_eigval=True, tie_word_embeddings=True),
}
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(padded, rows=3, length=37, seed=1):
    x = ids(rows, length, seed=seed)
    if not padded:
        return x, None
    mask = torch.ones_like(x)
    mask[0, :length // 4] = 0  # left padding
    mask[-1, length - length // 6:] = 0  # right padding (a row of its own when there are two or more)
    return x, mask


def train_step(model, x, mask):
    model.zero_grad()
    labels = x if mask is None else x.masked_fill(mask == 0, -100)
    out = model(x, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_step(eager, compiled, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(compiled[1], eager[1], rtol=rtol, atol=atol)
    for a, b in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("name, padded", [("delta_net", False), ("modern", True)])
def test_forward_and_loss_are_one_graph(name, padded):
    """(Every family's compiled step below runs with fullgraph=True, which fails at any break.)"""
    model = tiny_model(**FAMILIES[name])
    x, mask = batch(padded)
    explained = torch._dynamo.explain(model)(x, attention_mask=mask, labels=x)  # with the cache, as by default
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_training_step_equals_eager(name, padded):
    """fullgraph=True: the forward, the loss and (AOTAutograd) the backward each one graph; logits, loss and every
    parameter's gradient as eager's (float64, the chunk backend's custom operators inside). In eval mode, which with
    dropout 0 is the training maths without FAVOR+'s redraw (below)."""
    model = tiny_model(**FAMILIES[name])
    x, mask = batch(padded)
    eager = train_step(model, x, mask)
    assert_same_step(eager, train_step(torch.compile(model, backend="aot_eager", fullgraph=True), x, mask))


def test_favor_redraw_runs_outside_the_graph():
    """FAVOR+ in training draws a new matrix per forward from a seeded generator, which a graph cannot create: the
    draw runs eagerly between two graphs (its only break), and the compiled steps equal the eager ones draw for draw."""
    model = tiny_model(**FAMILIES["favor_sum"]).train()
    x, mask = batch(True)
    explained = torch._dynamo.explain(model)(x, attention_mask=mask, labels=x)
    assert explained.break_reasons and all("_redraw_random_features" in str(reason.reason)
                                           for reason in explained.break_reasons)
    torch._dynamo.reset()
    steps = {}
    for compiled in (False, True):
        model.model._favor_draws = 0
        run = torch.compile(model, backend="aot_eager") if compiled else model
        steps[compiled] = [train_step(run, x, mask) for _ in range(2)]
    for eager, compiled in zip(steps[False], steps[True]):
        assert_same_step(eager, compiled)
    assert not torch.equal(steps[True][0][0], steps[True][1][0])  # a new matrix at each step


@pytest.mark.slow
def test_inductor_training_step_equals_eager():
    """Inductor's generated code end to end, on the variant that touches the most layer code (pre-norm, short
    convolution, rotary, the z accumulator), padded."""
    model = tiny_model(block_style="pre_norm", use_short_conv=True, position_embedding="rotary",
                       attention_normalization=True, num_hidden_layers=1)
    x, mask = batch(True)
    eager = train_step(model, x, mask)
    assert_same_step(eager, train_step(torch.compile(model, fullgraph=True), x, mask), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------------ torch.export
def export(model, padded):
    x, mask = batch(padded, rows=2, length=20)
    rows, length = Dim("batch", min=1, max=64), Dim("seq", min=2, max=4096)
    shapes = {"input_ids": {0: rows, 1: length}, "attention_mask": {0: rows, 1: length} if padded else None,
              "use_cache": None}
    return torch.export.export(model, (), kwargs=dict(input_ids=x, attention_mask=mask, use_cache=False),
                               dynamic_shapes=shapes)


def operators(program):
    """Every call target of an exported program, its nested graphs included: exported under autocast, the update
    rule runs in a local autocast-off region, which export keeps as a `wrap_with_autocast` node with its own graph."""
    return [str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function"]


def new_shapes(padded):
    """Batches of other sizes than the one exported with (one sequence shorter than a chunk, one spanning three)."""
    for rows, length, seed in ((3, 11, 7), (1, 70, 8)):
        x, mask = batch(padded, rows=rows, length=length, seed=seed)
        yield x, mask


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", ["delta_net", "linear_transformer", "modern"])
def test_export_with_dynamic_batch_and_length(name, padded):
    model = tiny_model(**FAMILIES[name])
    program = export(model, padded).module()
    for x, mask in new_shapes(padded):
        got = program(input_ids=x, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got, model(x, attention_mask=mask, use_cache=False).logits, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning:copyreg")  # torch's own pytree pickling (LeafSpec), not ours
def test_aot_inductor_package_runs_the_exported_model(tmp_path):
    """The exported program compiled ahead of time into a .pt2 package, loaded back and run on new shapes (the
    update rule runs as the custom operator it was exported as)."""
    model = tiny_model(**FAMILIES["modern"], num_hidden_layers=1).float()
    package = torch._inductor.aoti_compile_and_package(export(model, padded=True),
                                                       package_path=str(tmp_path / "fwp.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    for x, mask in new_shapes(padded=True):
        got = runner(input_ids=x, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got, model(x, attention_mask=mask, use_cache=False).logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ Trainer
@pytest.mark.slow
def test_train_with_torch_compile(mini_corpus, tmp_path):
    """scripts/train.py --torch_compile true: the Trainer compiles the model (inductor), trains and saves it."""
    summary = train.main(run_args(mini_corpus, tmp_path / "compiled", "--torch_compile", "true", "--max_steps", "2",
                                  "--save_strategy", "no", "--max_eval_samples", "8"))
    assert 1 < summary["validation_perplexity"] < 320
    from modeling_fwp import FWPForCausalLM

    assert isinstance(FWPForCausalLM.from_pretrained(tmp_path / "compiled"), FWPForCausalLM)


# ------------------------------------------------------------------------------------------------ Triton operators
TRITON_CASES = {  # compiled (aot_eager) against the eager Triton path, both under the interpreter
    "delta": dict(rule="delta", grad=True, h0=True),
    "delta_nograd": dict(rule="delta", grad=False, h0=True),
    "delta_packed": dict(rule="delta", grad=True, h0=False, cu=[0, 5, 5, 40, 53]),
    "sum_no_h0": dict(rule="sum", grad=True, h0=False),
}


def run_triton_case(spec):
    """Largest absolute difference of o, the final state and every gradient, compiled against eager."""
    from modeling_fwp import ops_triton

    gen = torch.Generator().manual_seed(0)
    cu = None if "cu" not in spec else torch.tensor(spec["cu"], dtype=torch.int32)
    rows, heads, dim = (1 if cu is not None else 2), 2, 16
    length = 53
    q, v = torch.randn(rows, length, heads, dim, generator=gen), torch.randn(rows, length, heads, dim, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(rows, length, heads, dim, generator=gen), dim=-1)
    beta = torch.rand(rows, length, heads, generator=gen)
    h0 = torch.randn(len(spec["cu"]) - 1 if cu is not None else rows, heads, dim, dim, generator=gen)
    leaves = [q, k, v] + ([beta] if spec["rule"] == "delta" else []) + ([h0] if spec["h0"] else [])

    def rule(*tensors):
        q, k, v = tensors[:3]
        beta = tensors[3] if spec["rule"] == "delta" else None
        state = tensors[-1] if spec["h0"] else None
        kwargs = dict(initial_state=state, output_final_state=True, cu_seqlens=cu, chunk_size=16)
        if beta is None:
            return ops_triton.sum_rule_triton(q, k, v, **kwargs)
        return ops_triton.delta_rule_triton(q, k, v, beta, **kwargs)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    compiled = torch.compile(rule, backend=backend, fullgraph=True)
    results = []
    for fn in (rule, compiled):
        inputs = [t.clone().requires_grad_(spec["grad"]) for t in leaves]
        with torch.set_grad_enabled(spec["grad"]):
            o, state = fn(*inputs)
            grads = torch.autograd.grad(o.sum() + state.square().sum(), inputs) if spec["grad"] else []
        results.append([o, state, *grads])
    differences = [(a - b).abs().max().item() for a, b in zip(*results, strict=True)]
    return {"differences": differences, "operators": [t for g in graphs for t in g if "ops_triton_compile" in t]}


@pytest.fixture(scope="module")
def triton_results():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    return worker_results(__file__)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_operator_compiles_to_the_eager_result(case, triton_results):
    result = triton_results[case]
    assert "error" not in result, result.get("error")
    assert result["operators"], "the compiled graph does not call the Triton operator"
    assert max(result["differences"]) < 1e-5, result


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not CUDA, reason="needs a GPU (the Triton kernels)")
@pytest.mark.parametrize("name, padded", [("delta_net", False), ("linear_transformer", True), ("fla_gated", True)])
def test_cuda_compiled_training_step_equals_eager(name, padded):
    """On the GPU: no graph break with the Triton operators and PyTorch layer ops (which inductor fuses; eager runs
    the fused Triton norms and convolution instead), and the compiled step's logits and gradients as eager's."""
    torch.manual_seed(0)
    from modeling_fwp import FWPForCausalLM
    from test_model import tiny_config

    model = FWPForCausalLM(tiny_config(**FAMILIES[name], hidden_size=64, num_heads=2, head_dim=32)).cuda().train()
    x, mask = batch(padded, rows=4, length=150)
    x, mask = x.cuda(), None if mask is None else mask.cuda()
    explained = torch._dynamo.explain(model)(x, attention_mask=mask, labels=x, use_cache=False)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    eager = train_step(model, x, mask)
    assert_same_step(eager, train_step(torch.compile(model, fullgraph=True), x, mask), rtol=2e-3, atol=2e-4)


def export_with_triton_operator(device):
    """Export a padded tiny model whose update rule is the Triton kernels (on CPU: under the interpreter) and run the
    program on new shapes: whether the custom operator is in the graph, and the largest logit difference from eager."""
    from test_model import tiny_config

    from modeling_fwp import FWPForCausalLM

    torch.manual_seed(0)
    model = FWPForCausalLM(tiny_config(hidden_size=64, num_heads=2, head_dim=32, kernel_backend="triton"))
    model = model.to(device).eval()
    x, mask = batch(True, rows=2, length=20)
    rows, length = Dim("batch", min=1, max=64), Dim("seq", min=2, max=4096)
    program = torch.export.export(model, (), kwargs=dict(input_ids=x.to(device), attention_mask=mask.to(device),
                                                         use_cache=False),
                                  dynamic_shapes={"input_ids": {0: rows, 1: length},
                                                  "attention_mask": {0: rows, 1: length}, "use_cache": None})
    difference = 0.0
    for x, mask in new_shapes(True):
        x, mask = x.to(device), mask.to(device)
        got = program.module()(input_ids=x, attention_mask=mask, use_cache=False).logits
        want = model(x, attention_mask=mask, use_cache=False).logits
        difference = max(difference, (got - want).abs().max().item() / want.abs().max().item())
    return {"operators": [t for t in operators(program) if "ops_triton_compile" in t], "difference": difference}


def check_triton_export(result, tolerance):
    assert "error" not in result, result.get("error")
    assert result["operators"], "the exported graph does not call the Triton operator"
    assert result["difference"] < tolerance, result


def test_export_runs_the_triton_operator(triton_results):
    check_triton_export(triton_results["export"], 1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a GPU (the Triton kernels)")
def test_cuda_export_runs_the_triton_operator():
    # (eager runs the fused Triton norms on the GPU, the program PyTorch's: as the compiled step's tolerance)
    check_triton_export(export_with_triton_operator("cuda"), 2e-3)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_model import ids  # noqa: F401  (for batch())
    from triton_interpreter import run_cases

    run_cases(TRITON_CASES, run_triton_case, export=lambda: export_with_triton_operator("cpu"))
