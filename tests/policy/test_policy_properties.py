"""Policy files as data: an exact, stable round trip for every valid policy, and ``load`` of any byte
string either gives a Policy or raises PolicyError, never another exception.

The round trip is a Hypothesis property over policies built field by field (layer keys such as
``module.path::op_1``, the root ``""`` and ``"::softmax"``, every precision, unicode details,
infinite measured errors, optional scaler and verification records). The fuzz test mutates a real
saved policy file: byte flips, truncations, deleted/duplicated/renamed keys, values of another
type, nested garbage, huge numbers, NaN, wrong schema versions, empty and non-UTF-8 files.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import pathlib
import re
import tempfile

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import autoprec
from autoprec import LayerEntry, Policy, ScalerSettings, StepSpeed, Verification
from autoprec.core import FIX
from autoprec.policy import SCHEMA_VERSION
from tests.models import transformer_block

PRECISIONS = ("fp32", "fp16", "bf16")

# ---------------------------------------------------------------------------
# strategies: valid policies
# ---------------------------------------------------------------------------

# all of unicode, lone surrogates included (an exception text can carry anything)
any_text = st.text(st.characters(exclude_categories=()), max_size=24)
some_text = st.one_of(any_text, st.sampled_from(["", "cast", "overflow", "é ü 中文 🚀", "a|b", "line\nbreak",
                                                 "\x00nul", "tab\there", '"quoted"', "back\\slash"]))

ident = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
module_path = st.one_of(st.just(""), st.lists(st.one_of(ident, st.integers(0, 40).map(str)), min_size=1,
                                              max_size=4).map(".".join))
op_name = st.sampled_from(["softmax", "matmul", "index_add", "scaled_dot_product_attention", "layer_norm",
                           "exp", "sum", "cross_entropy"])
op_key = st.builds(lambda path, op, n: f"{path}::{op}" + (f"_{n}" if n else ""), module_path, op_name,
                   st.integers(0, 12))
layer_key = st.one_of(st.sampled_from(["", "::softmax", "::matmul_1", "encoder.layers.3.attn::softmax",
                                       "encoder.layers.3.attn.q", "module.path::op_1"]),
                      module_path, op_key, any_text)

finite = st.floats(allow_nan=False, allow_infinity=False)
measure_float = st.one_of(st.floats(allow_nan=False),
                          st.sampled_from([math.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308]))
positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
absmax = st.one_of(st.floats(min_value=0.0, allow_nan=False),
                   st.sampled_from([math.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308]))

hazard = st.one_of(st.sampled_from(["accumulation", "softmax", "variance/norm", "exp/log/pow", "long reduction",
                                    "position/trig", "loss"]), any_text)

entries = st.builds(
    LayerEntry,
    precision=st.sampled_from(PRECISIONS),
    reason=st.one_of(st.sampled_from(["cast", "overflow", "range", "underflow", "no gain", "combined error",
                                      "cannot run", "tied weights", "verification back-off"]), some_text),
    detail=some_text,
    excluded=st.booleans(),
    kind=st.sampled_from(["module", "op"]),
    op=some_text,
    hazards=st.lists(hazard, max_size=3).map(tuple),
    flops=st.integers(0, 2 ** 70),
    out_absmax=absmax,
    grad_absmax=absmax,
    measured=st.dictionaries(st.one_of(st.sampled_from(PRECISIONS), any_text),
                             st.dictionaries(st.one_of(st.sampled_from(["loss_err", "grad_err", "nonfinite",
                                                                        "underflow", "grad_underflow"]), any_text),
                                             measure_float, max_size=5),
                             max_size=3),
)

scalers = st.one_of(st.none(), st.builds(
    ScalerSettings,
    init_scale=st.one_of(st.integers(0, 60).map(lambda e: 2.0 ** e), positive),
    growth_factor=st.one_of(st.just(2.0), st.just(1.0), st.floats(min_value=1.0, max_value=1e300)),
    backoff_factor=st.floats(min_value=1e-6, max_value=1.0, exclude_max=True),
    growth_interval=st.integers(1, 10 ** 9),
))

loss_curve = st.lists(st.one_of(finite, st.just(math.inf)), max_size=6).map(tuple)  # NaN != NaN
fp32_curve = st.lists(finite, max_size=6).map(tuple)


@st.composite
def verifications(draw):
    """A Verification record that does not contradict itself: passed only with its gaps within the threshold."""
    bound, floor = draw(positive), draw(st.one_of(st.just(0.0), positive))
    threshold = max(bound, autoprec.policy.NOISE_MULTIPLE * floor)
    passed = draw(st.booleans())
    gap = st.floats(min_value=0.0, max_value=threshold) if passed else absmax
    compiled = draw(st.sampled_from(["", "aot_eager", "inductor"]))
    return Verification(passed=passed, steps=draw(st.integers(0, 10 ** 6)), fp32_losses=draw(fp32_curve),
                        policy_losses=draw(loss_curve), max_gap=draw(gap), bound=bound,
                        skipped_steps=draw(st.integers(0, 10 ** 6)), longest_skip_run=draw(st.integers(0, 10 ** 6)),
                        rounds=draw(st.integers(1, 100)), note=draw(some_text), compiled=compiled,
                        compiled_losses=draw(loss_curve) if compiled else (),
                        compiled_max_gap=draw(gap) if compiled else 0.0, noise_floor=floor,
                        nothing_cast=draw(st.booleans()),
                        flops_by_dtype=draw(st.dictionaries(st.sampled_from(["float32", "bfloat16", "float16"]),
                                                            st.integers(0, 2 ** 62), max_size=3)))


step_rounds = st.lists(st.floats(min_value=1e-9, max_value=1e6), min_size=1, max_size=5).map(tuple)
speeds = st.one_of(st.none(), st.builds(
    StepSpeed,
    source=st.sampled_from(["measured", "modelled"]),
    modelled=st.floats(min_value=0.0, max_value=1e6),
    profile=some_text,
    seconds=st.dictionaries(st.one_of(st.sampled_from(["fp32", "autocast bf16", "policy", "runner-up"]), any_text),
                            step_rounds, max_size=4),
    blanket=st.dictionaries(st.sampled_from(PRECISIONS[1:]), some_text, max_size=2),
    chosen=some_text,
    note=some_text,
))

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 100), 2 ** 100), st.floats(allow_nan=False),
                        some_text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(any_text, inner, max_size=3)),
                          max_leaves=8)

policies = st.builds(
    Policy,
    layers=st.dictionaries(layer_key, entries, max_size=6),
    target=st.sampled_from(["cpu", "cuda"]),
    modules=st.dictionaries(module_path, some_text, max_size=4),
    opaque=st.dictionaries(module_path, some_text, max_size=2),
    formats=st.lists(st.sampled_from(("fp16", "bf16")), unique=True).map(tuple),
    scaler=scalers,
    tolerance=st.one_of(st.just({}), st.fixed_dictionaries({"loss": positive, "grad": positive, "verify": positive}),
                        st.dictionaries(any_text, positive, max_size=3)),
    verification=st.one_of(st.none(), verifications()),
    stats=st.dictionaries(any_text, json_value, max_size=5),
    emulated=st.booleans(),
    speed=speeds,
)


def _save_text(policy: Policy, path: pathlib.Path) -> str:
    policy.save(path)
    return path.read_text(encoding="utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies)
def test_save_load_round_trip_and_stable_text(policy):
    """``load(save(p)) == p`` for any valid policy, and saving the loaded policy writes identical text."""
    with tempfile.TemporaryDirectory() as tmp:
        first, second = pathlib.Path(tmp, "a.json"), pathlib.Path(tmp, "b.json")
        text = _save_text(policy, first)
        loaded = autoprec.load(first)
        assert loaded == policy
        assert loaded.layers == policy.layers and list(loaded.layers) == list(policy.layers)  # the model's order
        assert loaded.scaler == policy.scaler and loaded.verification == policy.verification
        assert loaded.speed == policy.speed
        assert loaded.assignment == policy.assignment
        assert _save_text(loaded, second) == text
        assert sorted(p.name for p in pathlib.Path(tmp).iterdir()) == ["a.json", "b.json"]  # no *.tmp left


def test_round_trip_keeps_root_and_op_keys_verbatim(tmp_path):
    """The root key ``""`` and op keys keep their exact spelling, precision and infinite errors through a file."""
    keys = ["", "::softmax", "::matmul_1", "module.path::op_1", "encoder.layers.3.attn.q"]
    policy = Policy(layers={k: LayerEntry(p, measured={"bf16": {"loss_err": math.inf}})
                            for k, p in zip(keys, ["bf16", "fp32", "fp16", "bf16", "fp32"])}, target="cuda")
    policy.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert sorted(data["layers"]) == sorted(keys)
    assert data["schema_version"] == SCHEMA_VERSION
    loaded = autoprec.load(tmp_path / "p.json")
    assert loaded.assignment == policy.assignment
    assert loaded.layers["::softmax"].measured["bf16"]["loss_err"] == math.inf


# ---------------------------------------------------------------------------
# fuzz: a real policy file, mutated
# ---------------------------------------------------------------------------


@functools.cache
def real_policy_text() -> str:
    """A real tuned policy, saved: fp16 + bf16 layers, an op key, hazards, a scaler, a verification record."""
    model, batch, loss_fn = transformer_block(batch_size=2, seq_len=16)
    policy = autoprec.tune(model, batch, loss_fn, target="cuda", progress=False, verify_steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        policy.save(pathlib.Path(tmp, "p.json"))
        return pathlib.Path(tmp, "p.json").read_text(encoding="utf-8")


def test_real_policy_file_has_what_the_fuzzer_mutates():
    """The fuzz seed exercises every part of the schema: op keys, hazards, measured figures, scaler, verification,
    the speed record."""
    data = json.loads(real_policy_text())
    assert any("::" in k for k in data["layers"])
    assert any(e["hazards"] for e in data["layers"].values())
    assert any(e["measured"] for e in data["layers"].values())
    assert data["scaler"] is not None and data["verification"] is not None and data["stats"] and data["speed"]


class _Dup:
    """Marks an object whose serialisation repeats one key (JSON allows it; the last one wins)."""

    def __init__(self, data: dict, key: str, value) -> None:
        self.data, self.key, self.value = data, key, value


def _dumps(x) -> str:
    """json.dumps that understands _Dup and writes NaN/Infinity literals like Policy.save."""
    if isinstance(x, _Dup):
        items = list(x.data.items()) + [(x.key, x.value)]
        return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in items) + "}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_dumps(v)}" for k, v in x.items()) + "}"
    if isinstance(x, list):
        return "[" + ", ".join(_dumps(v) for v in x) + "]"
    if isinstance(x, _Raw):
        return x.text
    return json.dumps(x)


class _Raw:
    """A literal piece of JSON text (numbers json.dumps would not write)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _deep(depth: int, leaf=0):
    x = leaf
    for i in range(depth):
        x = [x] if i % 2 else {"g": x}
    return x


GARBAGE = [None, True, False, 0, -1, 1, 2, 1.5, -0.0, "", "fp8", "fp32", "x" * 5000, "\u202e\ufeff", [], {}, [1, 2],
           {"a": 1}, ["fp16", "bf16"], {"precision": "fp8"}, float("nan"), float("inf"), float("-inf"), 1e308,
           -1e308, 5e-324, 2 ** 63, -(2 ** 63), 2 ** 64 + 1, 10 ** 300, _deep(50), _deep(300),
           _Raw("1e400"), _Raw("-1e400"), _Raw("1e-400"), _Raw("NaN"), _Raw("-Infinity"),
           _Raw("123456789012345678901234567890.5e-10")]
SCHEMA_VERSIONS = [0, 3, -1, 1.5, "1", "v1", None, [1], {"v": 1}, 10 ** 20]


def _garbage(draw, choices=GARBAGE):
    """A fresh copy of one garbage value (later mutations edit the tree in place)."""
    return copy.deepcopy(draw(st.sampled_from(choices)))


def _paths(x, prefix=()):
    """Every path into a JSON tree (dict keys / list indices), containers included."""
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, prefix + (i,))


def _parent(root, path):
    node = root
    for p in path[:-1]:
        node = node[p]
    return node


def _mutate_tree(data, draw):
    """One structural mutation of the parsed JSON, in place; returns the (possibly new) root."""
    paths = list(_paths(data))
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["delete", "retype", "nest", "duplicate", "rename", "schema", "nan", "huge",
                                 "wrap_root"]))
    if kind == "schema":
        if isinstance(data, dict):
            data["schema_version"] = _garbage(draw, SCHEMA_VERSIONS)
        return data
    if kind == "wrap_root":
        return draw(st.sampled_from([[data], {"policy": data}, _deep(3, data), "policy", None]))
    if not path:
        return _garbage(draw) if kind == "retype" else data
    parent, key = _parent(data, path), path[-1]
    if kind == "delete":
        del parent[key]
    elif kind == "retype":
        parent[key] = _garbage(draw)
    elif kind == "nest":
        parent[key] = draw(st.sampled_from([[parent[key]], {"x": parent[key]}, _deep(20, parent[key])]))
    elif kind == "nan":
        parent[key] = draw(st.sampled_from([float("nan"), _Raw("NaN"), float("inf"), _Raw("-Infinity")]))
    elif kind == "huge":  # huge floats; huge *integers* are tested below
        parent[key] = draw(st.sampled_from([1e308, -1.7976931348623157e308, _Raw("1e400"), _Raw("9" * 300 + ".0")]))
    elif kind == "duplicate" and isinstance(parent, dict):
        parent_of = _parent(data, path[:-1]) if len(path) > 1 else None
        dup = _Dup(dict(parent), key, _garbage(draw, GARBAGE + [parent[key]]))
        if parent_of is None:
            return dup
        parent_of[path[-2]] = dup
    elif kind == "rename" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["", "precison", "layers", "LAYERS", "fc1 ", "::softmax", "é"]))] = parent.pop(key)
    return data


def _mutate_bytes(raw: bytes, draw) -> bytes:
    """One byte-level mutation."""
    kind = draw(st.sampled_from(["flip", "truncate", "delete", "insert", "empty", "random", "bom", "nul"]))
    n = len(raw)
    at = draw(st.integers(0, max(n - 1, 0)))
    if kind == "flip" and n:
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    if kind == "truncate":
        return raw[:at]
    if kind == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 64)):]
    if kind == "insert":
        junk = draw(st.one_of(st.binary(min_size=1, max_size=8),
                              st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"{", b"]", b",", b'"'])))
        return raw[:at] + junk + raw[at:]
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"null", b"{}", b"[]", b"0", b'""']))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "bom":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])) + raw
    if kind == "nul":
        return raw.replace(b'"', b"\x00", 1)
    return raw


@st.composite
def mutated_files(draw) -> bytes:
    data = json.loads(real_policy_text())
    for _ in range(draw(st.integers(0, 4))):
        data = _mutate_tree(data, draw)
    raw = _dumps(data).encode("utf-8", "surrogatepass")
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # most files keep valid JSON and reach validation
        raw = _mutate_bytes(raw, draw)
    return raw


def _load_bytes(raw: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp, "p.autoprec.json")
        path.write_bytes(raw)
        return autoprec.load(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=mutated_files())
@example(raw=b"")
@example(raw=b"\xff\xfe\x00\x00")
@example(raw=b'{"schema_version": 2, "layers": {}}')
@example(raw=b'{"schema_version": 1, "layers": {"fc": {"precision": "bf16"}}, "tolerance": {"loss": NaN}}')
@example(raw=b'{"schema_version": 1, "layers": {"fc": {"precision": "bf16", "flops": 1e400}}}')
@example(raw=b'{"schema_version": 1, "layers": {}, "scaler": {"init_scale": 1e400}}')
@example(raw=b'{"schema_version": 1, "layers": {}, "verification": {"fp32_losses": 5}}')
def test_fuzzed_policy_file_loads_or_raises_policy_error(raw):
    """A mutated real policy file either loads as a Policy or raises PolicyError: never another exception.

    A policy that does load is usable: its report renders and it saves again to text that reloads the same.
    """
    try:
        policy = _load_bytes(raw)
    except autoprec.PolicyError as exc:
        form = _message_form(str(exc))
        event(f"PolicyError: {form}")
        assert form is not None, f"a PolicyError that names no field, value and fix: {exc}"
        assert isinstance(exc, ValueError)
        return
    assert isinstance(policy, Policy)
    event("loaded")
    policy.report()
    policy.report("json")
    policy.low_precision_fraction()
    with tempfile.TemporaryDirectory() as tmp:
        text = _save_text(policy, pathlib.Path(tmp, "a.json"))
        again = autoprec.load(pathlib.Path(tmp, "a.json"))
        assert _save_text(again, pathlib.Path(tmp, "b.json")) == text


_WHERE = r"(?:(?:policy|layer '.*'|scaler|verification|speed|held_out): )?"
_FIX = re.escape(FIX)
#: Every form a PolicyError from ``load`` takes: a file that is not a policy, or one field named with the
#: value found, what is allowed, and the fix.
MESSAGE_FORMS = {
    "unreadable": r"policy file '.*' is not UTF-8 text: is it a policy file\?",
    "not json": r"policy file '.*' is not valid JSON \(.* at line \d+\): it may be truncated or corrupt; "
                r"re-run autoprec.tune",
    "not a policy": r"policy file '.*' is not a policy \(\w+\): it may be corrupt; re-run autoprec.tune",
    "not an object": r"a policy is a JSON object, got \w+: is this a policy file\?",
    "schema version": r"unknown policy schema version .*: this autoprec reads versions? 1(, 2)?; re-run autoprec.tune "
                      r"to make a new policy",
    "field": _WHERE + r"(?:LayerEntry|ScalerSettings|Verification|StepSpeed|HeldOut|Policy) field .+ is .+ \(\w+\); allowed: .+; " + _FIX,
    "unknown fields": _WHERE + r"unknown fields \[.*\]; a \w+ has \[.*\]; " + _FIX,
    "missing fields": _WHERE + r"required fields \[.*\] are missing; " + _FIX,
    "record not an object": _WHERE + r"expected an object of \w+ fields, got .+; " + _FIX,
    "contradiction": _WHERE + r"Verification is marked passed but its loss gap .* exceeds its threshold .*: the "
                              r"record contradicts itself; " + _FIX,
}


def _message_form(text: str) -> str | None:
    return next((name for name, form in MESSAGE_FORMS.items() if re.fullmatch(form, text, re.DOTALL)), None)


def test_unmutated_real_policy_loads():
    """The fuzz seed itself loads (the mutations start from a valid file)."""
    assert isinstance(_load_bytes(real_policy_text().encode()), Policy)


# ---------------------------------------------------------------------------
# known holes: inputs for which load raises something other than PolicyError
# ---------------------------------------------------------------------------

_BASE = '{"schema_version": 1, "layers": {"fc": {"precision": "bf16"%s}}%s}'
HUGE_INT = "1" + "0" * 400          # a JSON integer too large for a float
TOO_MANY_DIGITS = "1" + "0" * 5000  # more digits than Python's int-from-string limit (4300)

KNOWN_HOLES = {
    # json.loads raises RecursionError on deep nesting (policy.py load(): only JSONDecodeError is caught)
    "deep_nesting": "[" * 100_000 + "]" * 100_000,
    "deep_nesting_in_field": _BASE % ("", ', "stats": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    # float() of a huge int raises OverflowError (from_dict catches TypeError/ValueError/AttributeError only)
    "huge_int_tolerance": _BASE % ("", f', "tolerance": {{"loss": {HUGE_INT}}}'),
    "huge_int_verification_loss": _BASE % ("", (', "verification": {"passed": true, "steps": 1, "fp32_losses": ['
                                            f'{HUGE_INT}], "policy_losses": [], "max_gap": 0, "bound": 1, '
                                            '"skipped_steps": 0, "longest_skip_run": 0, "rounds": 1}')),
    # _entry() catches only TypeError around float(x) of 'measured'
    "huge_int_measured": _BASE % (f', "measured": {{"bf16": {{"loss_err": {HUGE_INT}}}}}', ""),
    # _scaler(): math.isfinite(huge int) raises OverflowError
    "huge_int_scaler": _BASE % ("", f', "scaler": {{"init_scale": {HUGE_INT}}}'),
    # json.loads raises a plain ValueError (not JSONDecodeError) for an integer of > 4300 digits
    "int_too_many_digits": _BASE % (f', "flops": {TOO_MANY_DIGITS}', ""),
}


@pytest.mark.parametrize("case", list(KNOWN_HOLES), ids=list(KNOWN_HOLES))
def test_pathological_numbers_and_nesting_raise_policy_error(case, tmp_path):
    """Deeply nested JSON and integers beyond float range are a corrupt policy: PolicyError, not a crash."""
    path = tmp_path / "p.json"
    path.write_text(KNOWN_HOLES[case], encoding="utf-8")
    with pytest.raises(autoprec.PolicyError) as info:
        autoprec.load(path)
    assert _message_form(str(info.value)) is not None, str(info.value)
