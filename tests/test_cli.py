"""The command line: tune, report, diff, exit codes, no tracebacks.

Every tune that trains runs ``python -m autoprec`` as a subprocess, as a user runs it, and so do ``--help`` and an
unknown command (the real entry point and its exit code); the report, diff and refused-input cases call
:func:`autoprec.cli.main` in this process (``_call``), the same function the entry point runs, without the second
of Python and torch start-up a subprocess costs each."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
        return model, torch.randn(256, 128)

    def make_wide():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
        return model, torch.randn(256, 128), lambda out, batch: out.square().mean()

    def broken():
        return "not a model"

    def unverifiable():
        # tests.models.unverifiable_tanh (this file runs outside the repository): BF16-valued weights and batch
        # make the noise floor exactly 0, so a bound of 1e-9 fails on every CPU
        torch.manual_seed(0)
        layers = []
        for _ in range(12):
            layers += [nn.Linear(64, 64), nn.Tanh()]
        model = nn.Sequential(*layers)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
        return model, torch.randn(128, 64).bfloat16().float()
''')


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoprec", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _call(*args: str, cwd) -> subprocess.CompletedProcess:
    """``autoprec.cli.main(args)`` in this process, run in ``cwd`` as ``python -m autoprec`` is (``cwd`` first on
    ``sys.path``; the modules it imported from there forgotten after), its stdout and stderr captured."""
    from autoprec.cli import main

    before, out, err = set(sys.modules), io.StringIO(), io.StringIO()
    sys.path.insert(0, str(cwd))
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.path.remove(str(cwd))
        for name in set(sys.modules) - before:
            if getattr(sys.modules[name], "__file__", None) and str(cwd) in sys.modules[name].__file__:
                del sys.modules[name]
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "factories.py").write_text(FACTORY)
    res = _run("tune", "factories:make", "--out", "p.json", "--quiet", "--verify-steps", "3", cwd=d)
    assert res.returncode == 0, res.stderr
    assert "wrote p.json" in res.stdout and "16-bit" in res.stdout
    return d


def test_tune_writes_a_loadable_policy(workdir):
    """`autoprec tune pkg.module:factory --out` writes a policy that autoprec.load reads."""
    import autoprec
    policy = autoprec.load(workdir / "p.json")
    assert policy.verification is not None and policy.layers


@pytest.mark.parametrize("flags,first", [((), "policy step time "), (("--no-measure-speed",), "modelled: policy step time ")],
                         ids=["timed", "no-measure-speed"])
def test_tune_ends_with_the_speed_line(workdir, flags, first):
    """The last line printed is what the policy buys: measured step times, or with --no-measure-speed the
    modelled figure, labelled; the per-layer modelled figure comes before it, labelled as such."""
    import os

    res = subprocess.run([sys.executable, "-m", "autoprec", "tune", "factories:make", "--out", "s.json", "--quiet",
                          "--verify-steps", "2", *flags], cwd=workdir, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "AUTOPREC_MEASURE_SPEED": "1"})
    assert res.returncode == 0, res.stderr
    last = res.stdout.splitlines()[-1]
    assert last.startswith(first)
    assert ("(measured here, median of " in last) if not flags else ("not measured: step timing switched off" in last)
    assert all(line.startswith("  modelled per layer (device profile") for line in res.stdout.splitlines()
               if "slower than FP32" in line or "x the FP32 time over them" in line)


def test_tune_says_what_ran_in_16_bit_and_why_nothing_was_cast(workdir):
    """The summary line gives the 16-bit share as verification ran it beside the prediction; a policy that casts
    nothing says why and what to do, and its verification that there was nothing to verify."""
    res = _run("tune", "factories:make", "--target", "cuda", "--out", "c.json", "--quiet", "--verify-steps", "2",
               cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert "100.0% of matmul/conv FLOPs in 16-bit as verification ran it (100.0% predicted)" in res.stdout
    res = _run("tune", "factories:make", "--out", "n.json", "--quiet", "--verify-steps", "2", cwd=workdir)
    assert res.returncode == 0, res.stderr
    first, why = res.stdout.splitlines()[:2]
    assert "0.0% of matmul/conv FLOPs in 16-bit: nothing cast (every layer FP32)" in first
    assert "verification nothing to verify" in first
    assert why.startswith("  nothing cast: 2 matmul/conv layer(s) gain nothing (0, 2): BF16 is not faster than FP32 "
                          "for these layer sizes on ") and "tune with a realistic batch size" in why


def test_tune_accepts_a_file_factory_and_dtypes(workdir):
    """A path/to/file.py:factory spec, a 3-tuple factory, --dtypes and --target work."""
    res = _run("tune", str(workdir / "factories.py") + ":make_wide", "--out", "q.json", "--quiet",
               "--dtypes", "fp16,bf16", "--target", "cuda", "--verify-steps", "0", "--budget", "5", cwd=workdir)
    assert res.returncode == 0, res.stderr
    data = json.loads((workdir / "q.json").read_text())
    assert data["target"] == "cuda" and data["formats"] == ["fp16", "bf16"]


@pytest.mark.parametrize("fmt,needle", [("md", "# autoprec policy report"), ("json", '"assignment"'),
                                        ("html", "<svg")], ids=["md", "json", "html"])
def test_report_formats(workdir, fmt, needle):
    """`autoprec report` prints Markdown, JSON or a self-contained HTML page."""
    res = _call("report", "p.json", "--format", fmt, cwd=workdir)
    assert res.returncode == 0 and needle in res.stdout


def test_report_to_file(workdir):
    """--out writes the report to a file."""
    res = _call("report", "p.json", "--format", "html", "--out", "r.html", cwd=workdir)
    assert res.returncode == 0
    assert (workdir / "r.html").read_text().startswith("<!DOCTYPE html>")


def test_report_shows_the_guards_revisions(workdir, tmp_path):
    """A policy the guard revised and saved: `autoprec report` lists each revision (step, layer, old -> new and
    the figures) in Markdown and HTML; a policy never guarded (the tuned p.json) has no such section."""
    import autoprec
    from tests.models import growing_model

    model, x, loss_fn = growing_model()
    policy = autoprec.Policy(layers={k: autoprec.LayerEntry(p) for k, p in
                                     {"fc": "fp32", "grow": "fp16", "norm": "fp32", "head": "fp32"}.items()},
                             target="cuda", formats=("fp16", "bf16"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with autoprec.guard(model, policy, loss_fn, every=4, check_every=0) as g:
        for _ in range(60):
            loss = loss_fn(model(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            g.step(loss)
    assert [(e.layer, e.old, e.new) for e in g.events] == [("grow", "fp16", "bf16")]
    g.policy.save(tmp_path / "guarded.json")
    step = g.events[0].step
    md = _call("report", "guarded.json", cwd=tmp_path)
    assert md.returncode == 0, md.stderr
    assert "## Revised during training (autoprec.guard)" in md.stdout and "| step | layer | old -> new | evidence |" in md.stdout
    assert f"| {step} | `grow` | fp16 -> bf16 | \\|out\\| max " in md.stdout and "x headroom 8 > 65504 |" in md.stdout
    page = _call("report", "guarded.json", "--format", "html", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    assert f"<td class=num>{step}</td><td><code>grow</code></td><td>fp16 -&gt; bf16</td><td>|out| max " in page.stdout
    assert "Revised during training" not in _call("report", "p.json", cwd=workdir).stdout


def test_diff_exit_codes(workdir):
    """diff exits 0 for the same policy and 1, listing the layers, for different ones."""
    assert _call("diff", "p.json", "p.json", cwd=workdir).returncode == 0
    data = json.loads((workdir / "p.json").read_text())
    data["layers"]["0"]["precision"] = "fp32" if data["layers"]["0"]["precision"] != "fp32" else "bf16"
    (workdir / "p2.json").write_text(json.dumps(data))
    res = _call("diff", "p.json", "p2.json", cwd=workdir)
    assert res.returncode == 1 and "~ 0:" in res.stdout
    res = _call("diff", "p.json", "p2.json", "--format", "json", cwd=workdir)
    assert res.returncode == 1 and "0" in json.loads(res.stdout)["changed"]


@pytest.mark.parametrize("args,code,needle", [
    (("tune", "nomodule:make", "--out", "x.json"), 2, "cannot import"),
    (("tune", "factories:nothing", "--out", "x.json"), 2, "no callable"),
    (("tune", "factories", "--out", "x.json"), 2, "pkg.module:function"),
    (("tune", "factories:broken", "--out", "x.json"), 2, "must return"),
    (("tune", "factories:make"), 2, "--out"),
    (("tune", "factories:make", "--out", "x.json", "--tolerance", "-1", "--quiet"), 3, "tolerance"),
    (("tune", "factories:make", "--out", "x.json", "--dtypes", "fp8", "--quiet"), 3, "fp8"),
    (("report", "missing.json"), 3, "cannot read policy file"),
    (("report", "p.json", "--format", "pdf"), 2, "invalid choice"),
    (("bogus",), 2, "invalid choice"),
], ids=["no-module", "no-callable", "no-colon", "bad-factory-result", "no-out", "bad-tolerance", "bad-dtype",
        "missing-policy", "bad-format", "bad-command"])
def test_bad_input_exit_codes_without_tracebacks(workdir, args, code, needle):
    """Bad arguments get their documented exit code and a one-line message, no traceback."""
    res = _call(*args, cwd=workdir)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_debug_shows_the_traceback(workdir):
    """--debug shows the traceback of a refused input."""
    res = _call("--debug", "report", "missing.json", cwd=workdir)
    assert res.returncode == 3 and "Traceback" in res.stderr


def test_help_lists_commands_and_exit_codes(workdir):
    """``python -m autoprec --help`` exits 0 and documents the commands and exit codes; an unknown command exits 2."""
    res = _run("--help", cwd=workdir)
    assert res.returncode == 0 and "tune" in res.stdout and "exit codes" in res.stdout
    res = _run("bogus", cwd=workdir)  # the entry point returns main's exit code
    assert res.returncode == 2 and "invalid choice" in res.stderr and "Traceback" not in res.stderr


def test_report_png_renders(workdir):
    """--format png draws the verification curves and the sensitivity chart (matplotlib extra)."""
    pytest.importorskip("matplotlib")
    res = _call("report", "p.json", "--format", "png", "--out", "chart.png", cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert (workdir / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _call("report", "p.json", "--format", "png", cwd=workdir).returncode == 2  # needs --out


def test_the_unverifiable_factory_is_the_test_models_one():
    """The CLI's unverifiable factory builds tests.models.unverifiable_tanh: BF16-valued weights, a zero noise floor."""
    import torch

    from tests.models import unverifiable_tanh
    scope: dict = {}
    exec(FACTORY, scope)
    (model, x), (ref, ref_x) = scope["unverifiable"](), unverifiable_tanh()
    assert torch.equal(x, ref_x) and torch.equal(x, x.bfloat16().float())
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, a.bfloat16().float()), k


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_a_policy_that_fails_verification_exits_5(workdir, strict):
    """Exit code 5 when verification fails: the file is written (and the failure printed) unless --strict."""
    out = workdir / f"unverified-{strict}.json"
    res = _run("tune", "factories:unverifiable", "--out", out.name, "--quiet", "--target", "cuda", "--dtypes", "bf16",
               "--verify-tolerance", "1e-9", "--verify-steps", "5", *(["--strict"] if strict else []), cwd=workdir)
    assert res.returncode == 5, (res.stdout, res.stderr)
    assert "FAILED verification" in res.stderr and "Traceback" not in res.stderr
    assert out.exists() != strict
    if strict:
        assert f"--strict: {out.name} not written" in res.stderr
    else:
        import autoprec
        assert autoprec.load(out).verification.passed is False
        assert "verification FAILED" in res.stdout


USER_FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn


    def _load(path):
        raise ValueError(f"no checkpoint at {path!r}")


    def raises():
        model = nn.Linear(4, 4)
        _load("weights.pt")
        return model, torch.randn(2, 4)


    def on_meta():
        with torch.device("meta"):
            model = nn.Linear(4, 4)
        return model, torch.randn(2, 4)
''')


@pytest.mark.parametrize("args,code,needles", [
    (["user:raises"], 2, ["factory 'user:raises' raised ValueError: no checkpoint at 'weights.pt'",
                          "(at user.py:7 in _load)", "fix the factory"]),
    (["broken_import:make"], 2, ["importing 'broken_import' raised RuntimeError: boom (at broken_import.py:2 in "
                                 "<module>)"]),
    (["user:on_meta"], 3, ["ModelError", "'meta' device", "model.to_empty(device='cpu')"]),
    (["user:on_meta", "--target", "cpu"], 3, ["ModelError", "'meta' device", "on any target"]),
], ids=["factory-raises", "module-raises", "model-on-meta", "model-on-meta-target-cpu"])
def test_the_users_own_failures_are_reported_as_theirs(tmp_path, args, code, needles):
    """A factory (or its module) that raises is a bad factory, exit 2, naming the error and its line in the
    user's file; a model on 'meta' is refused, exit 3, with what to do; never 'a bug?', never a traceback."""
    (tmp_path / "user.py").write_text(USER_FACTORIES)
    (tmp_path / "broken_import.py").write_text("import torch\nraise RuntimeError('boom')\n")
    res = _call("tune", *args, "--out", "x.json", "--quiet", cwd=tmp_path)
    assert res.returncode == code, (res.stdout, res.stderr)
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    assert "Traceback" not in res.stderr and "a bug?" not in res.stderr
    assert not (tmp_path / "x.json").exists()


def test_debug_shows_the_factorys_own_traceback(tmp_path):
    """--debug shows the traceback of the factory's exception, down to the user's line."""
    (tmp_path / "user.py").write_text(USER_FACTORIES)
    res = _call("--debug", "tune", "user:raises", "--out", "x.json", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stderr and 'user.py", line 7, in _load' in res.stderr
