"""The ``autoprec`` command line: tune a model from a factory, print or render a report, diff policies.

Exit codes (for scripts): 0 success (``diff``: the policies agree), 1 ``diff`` found differences,
2 bad command line or factory, 3 autoprec refused the input (an :class:`AutoprecError`: bad batch,
bad policy file, ...), 4 an unexpected error (a bug: re-run with ``--debug`` for the traceback),
5 ``tune``: the policy failed verification (written all the same, unless ``--strict``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

__all__ = ["main", "profile_table"]

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE, EXIT_REFUSED, EXIT_BUG, EXIT_UNVERIFIED = 0, 1, 2, 3, 4, 5

_EPILOG = """exit codes: 0 ok (diff: same), 1 diff: policies differ, 2 bad command line or factory,
3 autoprec refused the input (message says what and how to fix), 4 unexpected error (use --debug),
5 tune: the policy failed verification (the file is written anyway, except with --strict)

examples:
  autoprec calibrate --device cuda --dtypes fp16,bf16 --out h100.json   # on the GPU
  autoprec tune mypkg.models:make --out policy.json --target cuda --profile h100.json
  torchrun --nproc-per-node 4 -m autoprec tune mypkg.models:make --out policy.json   # passes split over 4 ranks
  autoprec report policy.json --format html --out report.html
  autoprec diff old.json new.json"""


class _UsageError(Exception):
    pass


def _load_factory(spec: str) -> Any:
    """``pkg.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    if ":" not in spec:
        raise _UsageError(f"factory {spec!r} must look like 'pkg.module:function' or 'file.py:function'")
    target, _, name = spec.rpartition(":")
    if os.getcwd() not in sys.path:  # the factory may import the project it lives in
        sys.path.insert(0, os.getcwd())
    try:
        if target.endswith(".py") or os.sep in target:
            mod_spec = importlib.util.spec_from_file_location("_autoprec_factory", target)
            if mod_spec is None or mod_spec.loader is None:
                raise _UsageError(f"cannot load {target!r} as a Python file")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except _UsageError:
        raise
    except FileNotFoundError:
        raise _UsageError(f"factory file {target!r} does not exist") from None
    except ImportError as exc:
        raise _UsageError(f"cannot import {target!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the factory's own module failed: the user's code, not autoprec
        raise _UsageError(f"importing {target!r} raised {_user_error(exc)}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise _UsageError(f"{target!r} has no callable {name!r}")
    return factory


def _make(spec: str) -> tuple[Any, Any, Any]:
    """Run the factory ``spec`` names: (model, batch, loss_fn); its own exception is a bad factory (exit 2)."""
    factory = _load_factory(spec)
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code failed, not autoprec: say where, no autoprec trace
        raise _UsageError(f"factory {spec!r} raised {_user_error(exc)}; fix the factory (--debug shows the "
                          "traceback)") from exc
    return _unpack(made)


def _user_error(exc: BaseException) -> str:
    """``ValueError: message (at path/file.py:12 in make)``: the error and its deepest frame in the user's
    own code (not in autoprec, the standard library or an installed package, where there is one)."""
    import sysconfig

    libraries = tuple(os.path.abspath(p) + os.sep for p in {os.path.dirname(os.path.abspath(__file__)),
                                                            *sysconfig.get_paths().values()})
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    own = [f for f in frames if not os.path.abspath(f.filename).startswith(libraries)]
    where = ""
    if own or frames:
        f = (own or frames)[-1]
        path = os.path.abspath(f.filename)
        path = os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path
        where = f" (at {path}:{f.lineno} in {f.name})"
    return f"{type(exc).__name__}: {str(exc)[:300]}{where}"


def _unpack(made: Any) -> tuple[Any, Any, Any]:
    if isinstance(made, dict) and "model" in made and "batch" in made:
        return made["model"], made["batch"], made.get("loss_fn")
    if isinstance(made, (tuple, list)) and len(made) in (2, 3):
        return made[0], made[1], made[2] if len(made) == 3 else None
    raise _UsageError("the factory must return (model, batch), (model, batch, loss_fn) or a dict with "
                      f"'model' and 'batch' (and optionally 'loss_fn'); it returned {type(made).__name__}")


@contextmanager
def _process_group() -> Iterator[int]:
    """Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, no process group yet): a process group for
    the command (gloo on a CPU, NCCL where CUDA is), destroyed at the end. Yields this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if "RANK" not in os.environ or world < 2:
        yield 0
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - main() called from a script that made its own group
        yield dist.get_rank()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # each rank its own GPU, for the factory's model and NCCL's objects
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank()
    finally:
        try:  # no rank tears the group down while a peer's last collective is in flight (gloo aborted a
            dist.barrier()  # rank with "terminate called without an active exception" when one did)
        finally:
            dist.destroy_process_group()


def _cmd_tune(args: argparse.Namespace) -> int:
    with _process_group() as rank:
        return _tune_and_write(args, rank)


def _tune_and_write(args: argparse.Namespace, rank: int) -> int:
    import autoprec

    from .policy._records import BACK_OFFS
    from .report._facts import held_out_line, why_nothing_cast

    model, batch, loss_fn = _make(args.factory)
    kwargs: dict[str, Any] = dict(dtypes=args.dtypes, target=args.target, tolerance=args.tolerance,
                                  grad_tolerance=args.grad_tolerance, verify_steps=args.verify_steps,
                                  storage=args.storage, seed=args.seed, progress=not args.quiet,
                                  verify_tolerance=args.verify_tolerance, strict=args.strict,
                                  profile=args.profile, share_roles=not args.no_share_roles,
                                  held_out=args.held_out, train_batch_size=args.train_batch_size)
    if args.no_measure_speed:
        kwargs["measure_speed"] = False
    if args.budget is not None:
        kwargs["n_trials"] = args.budget
    try:
        policy = autoprec.tune(model, batch, loss_fn, **kwargs)
    except autoprec.VerificationError as exc:
        if rank == 0:
            print(f"autoprec: {exc}; --strict: {args.out} not written", file=sys.stderr)
        return EXIT_UNVERIFIED
    ver = policy.verification
    if rank != 0:  # every rank holds the same policy: rank 0 writes it and reports
        return EXIT_UNVERIFIED if ver is not None and not ver.passed else EXIT_OK
    policy.save(args.out)
    excluded = policy.excluded()
    print(f"wrote {args.out}: {len(policy.layers)} layers, {_fraction(policy)}, {len(excluded)} excluded, "
          f"verification {_verdict(ver)}, {policy.stats.get('tuning_seconds', 0):.1f}s")
    why = why_nothing_cast(policy)
    if policy.held_out is not None and not policy.held_out.skipped:
        print(f"  held-out check: {held_out_line(policy).replace('**', '')}")
    if why:
        print(f"  {why}")
    for key, e in excluded.items():
        print(f"  excluded {key or '(root)'}: {e.reason}")
    if "profile" in policy.stats:
        print(f"  speed figures: {policy.stats['profile']}")
    for fmt, sp in sorted(policy.stats.get("format_speed", {}).items()):
        if sp["speed"] < 1:
            print(f"  modelled per layer (device profile, matmul/conv layers alone, not the step): {fmt} takes "
                  f"{1 / sp['speed']:.3g}x the FP32 time over them; {sp['layers'] - sp['faster']} of {sp['layers']} "
                  "stay FP32 for speed")
    for key, e in policy.layers.items():
        if e.reason in BACK_OFFS:
            by = "verification" if e.reason == "verification back-off" else "the held-out check"
            print(f"  backed off {key or '(root)'}: moved to FP32 by {by} (not measured to fail alone)")
    _print_speed(policy)
    if ver is not None and not ver.passed:
        print(f"autoprec: the policy in {args.out} FAILED verification (loss gap {ver.max_gap:.3g}, threshold "
              f"{ver.threshold:.3g}): exit code {EXIT_UNVERIFIED}; see 'autoprec report {args.out}'", file=sys.stderr)
        return EXIT_UNVERIFIED
    return EXIT_OK


def _print_speed(policy: Any) -> None:
    """What the policy buys, last: the figures behind it, then the speed line itself as the final line."""
    from .report._speed_lines import speed_lines

    lines = speed_lines(policy)
    for line in lines[1:]:
        print(f"  {line}")
    if lines:
        print(lines[0])


def _fraction(policy: Any) -> str:
    """The 16-bit share of the matmul/conv FLOPs: as verification ran the policy, beside the prediction."""
    predicted = f"{100 * policy.low_precision_fraction():.1f}%"
    ver = policy.verification
    measured = None if ver is None else ver.measured_fraction
    if measured is not None:
        return f"{100 * measured:.1f}% of matmul/conv FLOPs in 16-bit as verification ran it ({predicted} predicted)"
    if not any(e.precision != "fp32" for e in policy.layers.values()):
        return "0.0% of matmul/conv FLOPs in 16-bit: nothing cast (every layer FP32)"
    return f"{predicted} of matmul/conv FLOPs in 16-bit (predicted; not measured without verification)"


def _verdict(ver: Any) -> str:
    if ver is None:
        return "not run"
    if ver.nothing_cast:
        return "nothing to verify" if ver.rounds == 1 else f"backed off to nothing cast in {ver.rounds} rounds"
    return "passed" if ver.passed else "FAILED"


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .device._calibration import calibrate
    from .device._files import save_profile

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = [d for d in (args.dtypes or "bf16").split(",") if d.strip()]
    profile = calibrate(args.device, dtypes=dtypes, seconds=args.seconds, fresh=args.fresh)
    if args.out:
        save_profile(profile, args.out)
    print(f"{profile.device} ({profile.capability}), torch {profile.torch_version}, {profile.threads} thread(s): "
          + (f"measured in {profile.seconds:.2f}s" if profile.seconds else f"from the cache {profile.source}"))
    print(profile_table(profile))
    if args.out:
        print(f"wrote {args.out}")
    return EXIT_OK


def profile_table(profile: Any) -> str:
    """A device profile's figures as a Markdown table: forward+backward time per format.

    Example:
        >>> from autoprec.device import estimate
        >>> print(profile_table(estimate("cuda")).splitlines()[0])
        | figure | fp32 | fp16 | bf16 |
    """
    fmts = profile.formats
    rows = [f"| figure | {' | '.join(fmts)} |", "| --- |" + " ---: |" * len(fmts)]

    def us(x: float) -> str:
        return f"{x * 1e6:.3g} us" if x < 1e-3 else f"{x * 1e3:.3g} ms"
    rows.append("| region overhead per call | - | " + " | ".join(us(profile.region[f]) for f in fmts[1:]) + " |")
    rows.append("| cast per element, each way | - | "
                + " | ".join(f"{profile.cast[f] * 1e9:.3g} ns" for f in fmts[1:]) + " |")
    for kind, per in profile.elementwise.items():
        rows.append(f"| {kind}: per call / per element | "
                    + " | ".join(f"{us(per[f][0])} / {per[f][1] * 1e9:.3g} ns" for f in fmts) + " |")
    for c in profile.curves:
        for i, fl in enumerate(c.flops):
            rel = " | ".join(us(c.seconds[f][i])
                             + ("" if f == "fp32" else f" ({c.seconds['fp32'][i] / c.seconds[f][i]:.2f}x)")
                             for f in fmts)
            rows.append(f"| {c.kind} {fl / 1e6:.3g} MFLOP | {rel} |")
    return "\n".join(rows)


def _cmd_report(args: argparse.Namespace) -> int:
    import autoprec

    policy = autoprec.load(args.policy)
    if args.format == "png":
        if not args.out:
            raise _UsageError("--format png needs --out FILE.png")
        from .report._html import save_png
        save_png(policy, args.out)
        print(f"wrote {args.out}")
        return EXIT_OK
    text = policy.report(args.format)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def diff(a: Any, b: Any) -> dict[str, Any]:
    """What differs between two policies: layers only in one, precision changes, scaler, target.

    Example:
        >>> from autoprec import Policy, LayerEntry
        >>> diff(Policy(layers={"fc": LayerEntry("bf16")}), Policy(layers={"fc": LayerEntry("fp32")}))["changed"]
        {'fc': ['bf16', 'fp32']}
    """
    la, lb = a.assignment, b.assignment
    out: dict[str, Any] = {
        "only_in_a": sorted(set(la) - set(lb)),
        "only_in_b": sorted(set(lb) - set(la)),
        "changed": {k: [la[k], lb[k]] for k in la if k in lb and la[k] != lb[k]},
    }
    if a.target != b.target:
        out["target"] = [a.target, b.target]
    sa = None if a.scaler is None else vars(a.scaler)
    sb = None if b.scaler is None else vars(b.scaler)
    if sa != sb:
        out["scaler"] = [sa, sb]
    fa, fb = a.low_precision_fraction(), b.low_precision_fraction()
    if abs(fa - fb) > 1e-12:
        out["low_precision_flop_fraction"] = [fa, fb]
    return out


def _cmd_diff(args: argparse.Namespace) -> int:
    import autoprec

    d = diff(autoprec.load(args.a), autoprec.load(args.b))
    same = not any(d.values())
    if args.format == "json":
        print(json.dumps(d, indent=2, sort_keys=True))
    elif same:
        print(f"{args.a} and {args.b} assign the same precision to every layer")
    else:
        for k in d["only_in_a"]:
            print(f"- {k or '(root)'}  (only in {args.a})")
        for k in d["only_in_b"]:
            print(f"+ {k or '(root)'}  (only in {args.b})")
        for k, (pa, pb) in d["changed"].items():
            print(f"~ {k or '(root)'}: {pa} -> {pb}")
        for field in ("target", "scaler", "low_precision_flop_fraction"):
            if field in d:
                print(f"~ {field}: {d[field][0]} -> {d[field][1]}")
    return EXIT_OK if same else EXIT_DIFFERENT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoprec", description="Measured, per-layer mixed precision for PyTorch.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="{tune,calibrate,report,diff}")
    sub.required = True

    t = sub.add_parser("tune", help="tune a model and write its policy",
                       description="Tune the model a factory builds. The factory (no arguments) returns "
                                   "(model, batch), (model, batch, loss_fn) or a dict with those keys. Under "
                                   "torchrun every rank runs the factory (it must build the same model and batch) "
                                   "and a share of the passes; rank 0 writes the policy.")
    t.add_argument("factory", help="pkg.module:function or path/to/file.py:function")
    t.add_argument("--out", required=True, help="where to write the policy JSON")
    t.add_argument("--dtypes", help="formats allowed, comma separated (bf16,fp16; bf16,fp8 for Linears' GEMMs in "
                                    "FP8 on a CUDA target); default: what the target runs fast")
    t.add_argument("--target", choices=["cpu", "cuda"], help="device the policy is for (default: the model's)")
    t.add_argument("--tolerance", type=float, default=0.01, help="relative error bound at the loss (0.01)")
    t.add_argument("--grad-tolerance", type=float, default=0.05, help="relative L2 error bound of the gradients (0.05)")
    t.add_argument("--budget", type=int, help="Optuna trials at most (30)")
    t.add_argument("--verify-steps", type=int, default=20, help="training steps per verification run (20; 0 skips)")
    t.add_argument("--verify-tolerance", type=float, default=0.05,
                   help="bound on the verification loss gap, relative to the first loss (0.05)")
    t.add_argument("--strict", action="store_true",
                   help=f"a policy that fails verification is not written (exit {EXIT_UNVERIFIED} either way)")
    t.add_argument("--storage", help="Optuna storage URL to resume or share the study (sqlite:///study.db)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--held-out", type=float, default=0.25,
                   help="share of the batches (or of one batch's rows) the policy is checked on, not tuned on (0.25; "
                        "0 switches the check off)")
    t.add_argument("--train-batch-size", type=int, default=None, metavar="N",
                   help="rows of your real training step when the factory's batch is smaller: layers are priced "
                        "at that step (default: the batch as given)")
    t.add_argument("--profile", help="device profile JSON from 'autoprec calibrate' for the target device "
                                     "(default: calibrate here, or the built-in CUDA estimate)")
    t.add_argument("--no-share-roles", action="store_true",
                   help="probe every layer alone, not the roles of repeated blocks as groups first")
    t.add_argument("--no-measure-speed", action="store_true",
                   help="time no training steps: the speed figure is the device profile's (default: FP32, blanket "
                        "autocast and the policy are timed on the tuning batch when this device is the target)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    t.set_defaults(func=_cmd_tune)

    c = sub.add_parser("calibrate", help="measure this device's speed per format and write a profile",
                       description="Time matmul/conv/attention kernels, elementwise work, casts and the runtime's "
                                   "region overhead, forward+backward, in FP32 and each format; print the figures "
                                   "and write them as a device profile for 'tune --profile'.")
    c.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    c.add_argument("--dtypes", help="16-bit formats to measure, comma separated (default bf16)")
    c.add_argument("--seconds", type=float, default=3.0, help="time budget in seconds (3)")
    c.add_argument("--threads", type=int, help="intra-op threads to measure with (default: torch's)")
    c.add_argument("--out", help="write the profile JSON here")
    c.add_argument("--fresh", action="store_true", help="measure again and replace this machine's cached profile (the one tune prices formats with)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_calibrate)

    r = sub.add_parser("report", help="print or render a policy's report")
    r.add_argument("policy", help="a policy JSON written by 'autoprec tune' or Policy.save")
    r.add_argument("--format", choices=["md", "json", "html", "png"], default="md")
    r.add_argument("--out", help="write to this file instead of stdout (required for png)")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.set_defaults(func=_cmd_report)

    d = sub.add_parser("diff", help="compare two policies (exit 1 when they differ)")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--format", choices=["text", "json"], default="text")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    d.set_defaults(func=_cmd_diff)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Example:
        >>> main(["report", "/no/such/policy.json"])  # the message goes to stderr
        3
    """
    from .errors import AutoprecError

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="autoprec: %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _UsageError as exc:
        if args.debug and exc.__cause__ is not None:  # the factory's own traceback
            cause = exc.__cause__
            traceback.print_exception(type(cause), cause, cause.__traceback__)
        print(f"autoprec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AutoprecError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"autoprec: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("autoprec: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no stack trace unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"autoprec: unexpected {type(exc).__name__}: {exc} (a bug? re-run with --debug and report it)",
              file=sys.stderr)
        return EXIT_BUG


def main_exit() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
