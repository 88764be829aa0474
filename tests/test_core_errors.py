"""Bad input fails clearly and leaves the model clean; unreadable forwards still work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import neurotap as nt
from conftest import assert_clean, assert_same_output, example_inputs, snapshot_state

POINT = "model.layers.0.mlp.mul"  # [2, 7, 128] for example_inputs("llama")


def _failure_and_forwards(module: nn.Module, action) -> tuple[Exception, int]:
    """The exception ``action()`` raised, and how many times the root's forward started before it."""
    count = [0]
    handle = module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the caller checks the type
        return error, count[0]
    finally:
        handle.remove()
    raise AssertionError("no error was raised")


def _assert_unharmed(model: nt.Model, state, baseline) -> None:
    assert_clean(model.module, state)
    with torch.no_grad():
        assert_same_output(model(**example_inputs("llama")), baseline)
        probed = model.forward(**example_inputs("llama"), probes=[nt.probe(POINT, nt.Record(key="check"))])
    assert_same_output(probed, baseline)
    assert_clean(model.module, state)


@pytest.fixture
def setup(llama):
    llama.points()  # take the inventory now, so the dry run does not count as a forward below
    state = snapshot_state(llama.module)
    with torch.no_grad():
        baseline = llama.module(**example_inputs("llama"))
    return llama, state, baseline


# -- unknown points -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, closest",
    [
        ("model.layers.0.mlp.mull", "model.layers.0.mlp.mul"),
        ("model.layer.0.mlp.mul", "model.layers.0.mlp.mul"),
        ("model.layers.0.self_attn.attention_interface.softmx", "model.layers.0.self_attn.attention_interface.softmax"),
        ("model.layers.1.mlp.down_proj.outptu", "model.layers.1.mlp.down_proj.output"),
    ],
    ids=["typo-op", "typo-module", "typo-helper", "typo-kind"],
)
@pytest.mark.parametrize("how", ["forward", "patch", "generate"])
def test_core_unknown_point_fails_before_forward(setup, name, closest, how) -> None:
    model, state, baseline = setup
    inputs = example_inputs("llama")

    def attempt() -> None:
        if how == "forward":
            model.forward(**inputs, probes=[nt.probe(POINT, nt.Record()), nt.probe(name, nt.Record())])
        elif how == "generate":
            model.generate(**inputs, max_new_tokens=2, probes=[nt.probe(name, nt.Record())])
        else:
            with model.patch({POINT: nt.Zero(), name: nt.Zero()}):
                pytest.fail("the block must not run")

    error, forwards = _failure_and_forwards(model.module, attempt)
    assert isinstance(error, nt.UnknownPointError)
    assert forwards == 0
    message = str(error)
    assert repr(name) in message
    assert closest in message
    assert model.recordings() == {}
    _assert_unharmed(model, state, baseline)


def test_core_unknown_point_errors_are_catchable_as_key_errors(setup) -> None:
    model, _, _ = setup
    with pytest.raises(KeyError):
        model.forward(**example_inputs("llama"), probes=[nt.probe("nowhere", nt.Record())])
    with pytest.raises(nt.NeurotapError):
        model.points("model.layers.9")


def test_core_unparseable_narrowing_fails_before_forward(setup) -> None:
    model, state, baseline = setup
    attempt = lambda: model.forward(  # noqa: E731
        **example_inputs("llama"), probes=[nt.probe("model.layers.0.self_attn.output[first]", nt.Record())]
    )
    error, forwards = _failure_and_forwards(model.module, attempt)
    assert isinstance(error, nt.UnknownPointError) and "[0]" in str(error)
    assert forwards == 0
    _assert_unharmed(model, state, baseline)


def test_core_narrowing_to_a_missing_member_names_the_point(setup) -> None:
    model, state, baseline = setup
    with pytest.raises(nt.NeurotapError, match=re.escape("model.layers.0.self_attn.output")):
        model.forward(**example_inputs("llama"), probes=[nt.probe("model.layers.0.self_attn.output[5]", nt.Record())])
    _assert_unharmed(model, state, baseline)


@pytest.mark.xfail(
    strict=True,
    reason="narrowing is only checked against the inventory for the point's base name; a member that does not "
    "exist is found when the forward reaches it, not before the forward starts",
)
def test_core_narrowing_to_a_missing_member_fails_before_forward(setup) -> None:
    model, _, _ = setup
    attempt = lambda: model.forward(  # noqa: E731
        **example_inputs("llama"), probes=[nt.probe("model.layers.0.self_attn.output[5]", nt.Record())]
    )
    error, forwards = _failure_and_forwards(model.module, attempt)
    assert isinstance(error, nt.UnknownPointError)
    assert forwards == 0


# -- patches that do not fit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, fragments",
    [
        (nt.Replace(value=torch.zeros(5)), ["(5,)", "(2, 7, 128)"]),
        (nt.Add(value=torch.zeros(3, 128)), ["(3, 128)", "(2, 7, 128)"]),
        (nt.Add(value=torch.zeros(4), index=(..., 3)), ["(4,)", "(2, 7)", "index"]),
        (nt.Scale(factor=torch.ones(7, 1, 2)), ["(7, 1, 2)", "(2, 7, 128)"]),
        (nt.Replace(value=torch.ones(2, 7, 128, dtype=torch.long)), ["int64", "float32"]),
        (nt.Zero(index=(..., 200)), ["200", "(2, 7, 128)"]),
        (nt.Replace(value=1.0, index=(0, 0, 0, 0)), ["(0, 0, 0, 0)", "(2, 7, 128)"]),
        (nt.Record(index=(5,)), ["(5,)", "(2, 7, 128)"]),
        (nt.Project(direction=torch.ones(64)), ["(64,)", "128"]),
    ],
    ids=[
        "replace-shape",
        "add-shape",
        "add-shape-at-index",
        "scale-shape",
        "replace-dtype",
        "index-out-of-range",
        "index-too-deep",
        "record-index",
        "project-direction",
    ],
)
@pytest.mark.parametrize("how", ["forward", "patch"])
def test_core_patch_that_does_not_fit(setup, patch, fragments, how) -> None:
    model, state, baseline = setup
    inputs = example_inputs("llama")
    with pytest.raises(nt.PatchError) as raised, torch.no_grad():
        if how == "forward":
            model.forward(**inputs, probes=[nt.probe(POINT, patch)])
        else:
            with model.patch({POINT: patch}):
                model(**inputs)
    message = str(raised.value)
    assert POINT in message
    for fragment in fragments:
        assert fragment in message
    _assert_unharmed(model, state, baseline)


@pytest.mark.parametrize(
    "result, fragments",
    [
        (lambda v: v[..., :5], ["(2, 7, 5)", "(2, 7, 128)"]),
        (lambda v: v.double(), ["float64", "float32"]),
        (lambda v: "not a tensor", ["str"]),
    ],
    ids=["shape", "dtype", "type"],
)
def test_core_probe_returning_a_misfit(setup, result, fragments) -> None:
    model, state, baseline = setup
    with pytest.raises(nt.PatchError) as raised, torch.no_grad():
        model.forward(**example_inputs("llama"), probes=[nt.probe(POINT, lambda ctx, v: result(v))])
    assert POINT in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)
    _assert_unharmed(model, state, baseline)


def test_core_running_reduction_with_changing_shape(setup) -> None:
    model, state, baseline = setup
    mean = nt.probe(POINT, nt.Mean(dims=0))  # [seq, units]: changes with the sequence length
    with torch.no_grad():
        model.forward(**example_inputs("llama"), probes=[mean])
        with pytest.raises(nt.PatchError, match=r"\(4, 128\).*\(7, 128\)"):
            model.forward(**example_inputs("llama", seq=4), probes=[mean])
    _assert_unharmed(model, state, baseline)


# -- probes that raise ----------------------------------------------------------------------------


class Boom(Exception):
    pass


def _explode(ctx: nt.SaveContext, value: object) -> None:
    raise Boom("probe failed on purpose")


@pytest.mark.parametrize(
    "point",
    [
        POINT,
        "model.layers.0.self_attn.attention_interface.softmax",
        "model.layers.1.output",
        "lm_head.input",
        "model.layers.0.self_attn.output[0]",
    ],
    ids=["op", "helper-op", "module-output", "module-input", "narrowed"],
)
def test_core_raising_probe_names_the_point(setup, point) -> None:
    model, state, baseline = setup
    with pytest.raises(nt.ProbeError) as raised, torch.no_grad():
        model.forward(**example_inputs("llama"), probes=[nt.probe(point, _explode)])
    assert point in str(raised.value)
    assert "probe failed on purpose" in str(raised.value)
    assert isinstance(raised.value.__cause__, Boom)
    _assert_unharmed(model, state, baseline)


def test_core_raising_probe_inside_patch_block(setup) -> None:
    model, state, baseline = setup
    inputs = example_inputs("llama")
    with torch.no_grad(), model.patch({POINT: nt.Zero(index=(..., 3))}):
        patched = model(**inputs)
        with pytest.raises(nt.ProbeError, match=re.escape("model.layers.1.mlp.mul")):
            model.forward(**inputs, probes=[nt.probe("model.layers.1.mlp.mul", _explode)])
        assert_same_output(model(**inputs), patched)  # the block's patch is still there
    _assert_unharmed(model, state, baseline)


def test_core_raising_probe_during_generate(setup) -> None:
    model, state, baseline = setup

    def explode_at_step_2(ctx: nt.SaveContext, value: object) -> None:
        if ctx.step == 2:
            raise Boom("step 2")

    prompt = example_inputs("llama", batch=1)
    with pytest.raises(nt.ProbeError, match="step 2"):
        model.generate(**prompt, max_new_tokens=4, do_sample=False, probes=[nt.probe(POINT, explode_at_step_2)])
    _assert_unharmed(model, state, baseline)
    expected = model.module.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**prompt, max_new_tokens=4, do_sample=False), expected)


def test_core_raising_gradient_probe(setup) -> None:
    model, state, baseline = setup
    output = model.forward(**example_inputs("llama"), probes=[nt.probe(POINT, _explode, grad=True)])
    try:
        with pytest.raises(nt.ProbeError, match=re.escape(POINT)):
            output.logits.sum().backward()
    finally:
        model.module.zero_grad(set_to_none=True)
    _assert_unharmed(model, state, baseline)


def test_core_gradient_probe_without_autograd(setup) -> None:
    model, state, baseline = setup
    with pytest.raises(nt.NeurotapError, match="does not require grad"), torch.no_grad():
        model.forward(**example_inputs("llama"), probes=[nt.probe(POINT, nt.Record(), grad=True)])
    _assert_unharmed(model, state, baseline)


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: nt.probe(3, nt.Record()), "point name"),
        (lambda: nt.probe(POINT, "not callable"), "callable"),
    ],
    ids=["point-not-str", "fn-not-callable"],
)
def test_core_bad_probe_arguments(make, error) -> None:
    with pytest.raises(TypeError, match=error):
        make()


def test_core_bad_wrap_and_forward_arguments(setup) -> None:
    model, state, baseline = setup
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nt.wrap(lambda x: x)
    with pytest.raises(TypeError, match="nt.probe"):
        model.forward(**example_inputs("llama"), probes=[(POINT, nt.Record())])
    with pytest.raises(TypeError, match="dict"):
        with model.patch([(POINT, nt.Zero())]):
            pass
    _assert_unharmed(model, state, baseline)


# -- points the call never reached ----------------------------------------------------------------


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(4, 4)
        self.alt = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, flag: bool = False) -> torch.Tensor:
        return self.alt(x) * 2 if flag else self.main(x) + 1


def test_core_a_point_the_forward_never_reached_fails_the_call() -> None:
    torch.manual_seed(0)
    module = Branches()
    x = torch.randn(3, 4)
    state = snapshot_state(module)
    model = nt.wrap(module, example=x)
    with torch.no_grad():
        expected = module(x)
        probes = [nt.probe("main.output", nt.Record()), nt.probe("alt.output", nt.Zero()), nt.probe("mul", nt.Record())]
        with pytest.raises(nt.MissedPointError) as raised:
            model.forward(x, probes=probes)
    assert raised.value.points == ["alt.output", "mul"]
    assert "'alt.output', 'mul'" in str(raised.value) and "optional=True" in str(raised.value)
    assert "main.output" not in str(raised.value)
    assert torch.equal(model.recordings()["main.output"]["record"][0], module.main(x))  # what did run is kept
    assert_clean(module, state)
    with torch.no_grad():
        optional = [nt.probe("alt.output", nt.Zero(), optional=True), nt.probe("mul", nt.Record(), optional=True)]
        assert torch.equal(model.forward(x, probes=optional), expected)
        assert torch.equal(model.forward(x, flag=True, probes=optional), torch.zeros(3, 4))
    assert_clean(module, state)


def test_core_a_patch_block_point_never_reached_fails_each_call() -> None:
    torch.manual_seed(0)
    module = Branches()
    x = torch.randn(3, 4)
    model = nt.wrap(module, example=x)
    with torch.no_grad():
        expected = module(x)
        with model.patch({"alt.output": nt.Zero()}):
            with pytest.raises(nt.MissedPointError, match="alt.output"):
                model(x)
            assert torch.equal(model(x, flag=True), torch.zeros(3, 4))
            with pytest.raises(nt.MissedPointError, match="alt.output"):
                model.forward(x, probes=[nt.probe("main.output", nt.Record())])
            # a call made directly on the module may be one step of something longer (generate): it warns
            with pytest.warns(nt.MissedPointWarning, match="directly on the module.*'alt.output'"):
                assert torch.equal(module(x), expected)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert torch.equal(module(x, flag=True), torch.zeros(3, 4))
        with model.patch({"alt.output": nt.Zero()}, optional=True), warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(model(x), expected)
            assert torch.equal(module(x), expected)
    assert_clean(module)


def test_core_generate_warns_once_about_points_it_never_reached(setup) -> None:
    model, state, _ = setup
    prompt = example_inputs("llama", batch=1)
    expected = model.module.generate(**prompt, max_new_tokens=3, do_sample=False)
    with pytest.warns(nt.MissedPointWarning, match="'loss_function'") as warned:
        tokens = model.generate(
            **prompt,
            max_new_tokens=3,
            do_sample=False,
            probes=[nt.probe("loss_function", nt.Record()), nt.probe(POINT, nt.Record())],
        )
    assert len([w for w in warned if issubclass(w.category, nt.MissedPointWarning)]) == 1
    assert torch.equal(tokens, expected)
    assert len(model.recordings()[POINT]["record"]) == 3
    assert_clean(model.module, state)


def test_core_a_point_reached_only_with_some_inputs(setup) -> None:
    """The loss is computed only when labels are given: so is the point ``loss_function``."""
    model, state, baseline = setup
    inputs = example_inputs("llama")
    with torch.no_grad(), pytest.raises(nt.MissedPointError, match="loss_function"):
        model.forward(**inputs, probes=[nt.probe("loss_function", nt.Record())])
    with torch.no_grad():
        output = model.forward(**inputs, labels=inputs["input_ids"], probes=[nt.probe("loss_function", nt.Record())])
    assert torch.equal(model.recordings()["loss_function"]["record"][0], output.loss)
    targets = inputs["input_ids"].roll(-1, dims=1)
    with pytest.raises(nt.MissedPointError, match="loss_function"):
        model.backward(**inputs, loss=nt.CrossEntropy(targets), probes=[nt.probe("loss_function", nt.Record())])
    assert all(p.grad is None for p in model.module.parameters())
    _assert_unharmed(model, state, baseline)


# -- forwards whose source cannot be read ---------------------------------------------------------

_HIDDEN_SOURCE = """
class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) * 2.0 + 1.0
"""


def _exec_class() -> type:
    namespace = {"nn": nn, "__name__": "generated_models"}
    exec(compile(_HIDDEN_SOURCE, "<generated>", "exec"), namespace)
    return namespace["Hidden"]


def _type_class() -> type:
    def init(self) -> None:
        nn.Module.__init__(self)
        self.inner = nn.Linear(4, 4)

    forward = eval("lambda self, x: self.inner(x) * 2.0 + 1.0")
    return type("Hidden", (nn.Module,), {"__init__": init, "forward": forward})


class Outer(nn.Module):
    def __init__(self, hidden: nn.Module) -> None:
        super().__init__()
        self.hidden = hidden
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)) - 0.5


@pytest.mark.parametrize("make", [_exec_class, _type_class], ids=["exec", "type"])
@pytest.mark.parametrize("nested", [False, True], ids=["root", "nested"])
def test_core_unreadable_forward_keeps_module_points(make, nested) -> None:
    torch.manual_seed(0)
    hidden = make()()
    module = Outer(hidden) if nested else hidden
    prefix = "hidden." if nested else ""
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = module(x)
    model = nt.wrap(module, example=x)
    with pytest.warns(nt.SourceUnavailableWarning) as warned:
        names = model.points().names()
        model.points()
        with torch.no_grad():
            output = model.forward(x, probes=[nt.probe(f"{prefix}inner.output", nt.Zero(index=(..., 1)))])
            read = model.forward(x, probes=[nt.probe(f"{prefix}output", nt.Record())])
    assert len(warned) == 1
    assert "Hidden" in str(warned[0].message)
    assert {f"{prefix}input", f"{prefix}inner.input", f"{prefix}inner.output", f"{prefix}output"} <= set(names)
    assert not any(n.startswith(f"{prefix}mul") or n.startswith(f"{prefix}add") for n in names)
    if nested:
        assert "sub" in names  # Outer's own ops are still there
    with torch.no_grad():
        inner = hidden.inner(x)
        inner[..., 1] = 0.0
        patched_hidden = inner * 2.0 + 1.0
        expected_patched = module.out(patched_hidden) - 0.5 if nested else patched_hidden
        assert torch.equal(read, expected)
    assert torch.equal(output, expected_patched)
    assert torch.equal(model.recordings()[f"{prefix}output"]["record"][0], hidden(x) if nested else expected)
    assert_clean(module)


# -- the public surface ---------------------------------------------------------------------------

PUBLIC = [
    "ActivationDataset",
    "Add",
    "CrossEntropy",
    "Custom",
    "LogitDiff",
    "Max",
    "Mean",
    "MissedPointError",
    "MissedPointWarning",
    "Model",
    "NeurotapError",
    "Norm",
    "NotSentWarning",
    "Patch",
    "PatchError",
    "Point",
    "PointList",
    "Probe",
    "ProbeError",
    "Probability",
    "Project",
    "Record",
    "RemoteModel",
    "Replace",
    "SaveContext",
    "Scale",
    "SAE",
    "Skip",
    "SourceUnavailableWarning",
    "Sum",
    "TopK",
    "Trace",
    "UnknownPointError",
    "Zero",
    "__version__",
    "collect",
    "connect",
    "experiments",
    "launch_and_connect",
    "load",
    "plot",
    "probe",
    "stop",
    "wrap",
]


def test_core_public_surface_is_the_documented_list() -> None:
    assert sorted(nt.__all__) == sorted(PUBLIC)
    assert len(nt.__all__) == len(set(nt.__all__))
    for name in PUBLIC:
        assert hasattr(nt, name), name
    errors = (nt.UnknownPointError, nt.PatchError, nt.ProbeError, nt.MissedPointError)
    assert all(issubclass(error, nt.NeurotapError) for error in errors)
    assert issubclass(nt.SourceUnavailableWarning, UserWarning)
    assert issubclass(nt.MissedPointWarning, UserWarning)


_SCRIPT = """
import torch, neurotap as nt
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)
m = nt.wrap(LlamaForCausalLM(config).eval())
ids = torch.tensor([[1, 2, 3]])
misfit = nt.Replace(torch.zeros(7))
"""


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        ("m.forward(ids, probes=[nt.probe('model.layers.0.mlp.mul', misfit)])", "PatchError", "does not fit"),
        ("with m.patch({'model.layers.1.mlp.mul': misfit}):\n    m.generate(ids, max_new_tokens=2)", "PatchError",
         "does not fit"),
        ("m.run(ids, record='model.layers.*.mlp.mull')", "UnknownPointError", "no point matches"),
        ("with m.patch({'model.layers.0.mlp.mull': misfit}):\n    pass", "UnknownPointError", "no point named"),
        ("m.backward(ids, loss=nt.LogitDiff(1, 2), probes=[nt.probe('args.labels', nt.Record())])", "MissedPointError",
         "without reaching 'args.labels'"),
        ("m.forward(ids, probes=[nt.probe('model.layers.0.mlp.mul', lambda ctx, value: 1 / 0)])", "ProbeError",
         "raised ZeroDivisionError"),
        ("with m.patch({'model.layers.0.mlp.mul': misfit}):\n    m.module(ids)", "PatchError", "does not fit"),
        ("with m.patch({'model.layers.1.mlp.mul': nt.Custom(lambda ctx, value: 1 / 0)}):\n    m.module(ids)",
         "ProbeError", "raised ZeroDivisionError"),
        ("nt.experiments.activation_patching(m, ids, ids, nt.LogitDiff(1, 2), ['model.layers.0.mlp.mull'])",
         "UnknownPointError", "no point named"),
        ("nt.experiments.causal_trace(m, ids, [0], 3, points=['model.layers.0.output'], samples=2, batch=0)",
         "NeurotapError", "batch (rows per forward) must be a positive integer"),
    ],
)  # fmt: skip
def test_core_an_error_in_user_code_is_on_top_of_a_short_traceback(tmp_path, call: str, error: str, says: str) -> None:
    """Raised from the call the user made: the model's and the library's frames under it would bury the message."""
    script = tmp_path / "user.py"
    script.write_text(_SCRIPT + call + "\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    printed = result.stderr.strip().splitlines()
    assert result.returncode == 1 and printed[-1].startswith(f"neurotap.errors.{error}: "), result.stderr[-3000:]
    assert says in printed[-1]
    frames = [line for line in printed if line.lstrip().startswith('File "')]
    assert frames[-2].endswith(", in <module>") and str(script) in frames[-2], frames  # the user's own line
    inside = [frame for frame in frames if f"{os.sep}neurotap{os.sep}" in frame]
    assert len(inside) <= (2 if error == "ProbeError" else 1), frames  # a probe's own exception keeps its place


@pytest.mark.parametrize(
    "call",
    [
        "m.forward(ids, probes=[nt.probe('model.layers.0.mlp.mul', misfit)])",
        "with m.patch({'model.layers.0.mlp.mul': misfit}):\n    m.module(ids)",
    ],
)
def test_core_full_tracebacks_are_kept_on_request(tmp_path, call: str) -> None:
    script = tmp_path / "user.py"
    script.write_text(_SCRIPT + call + "\n")
    env = {**os.environ, "NEUROTAP_FULL_TRACEBACKS": "1"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert "neurotap.errors.PatchError: " in result.stderr and "in _fitted" in result.stderr  # where it was found
