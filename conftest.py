"""Doctest collection skips the integrations whose optional framework is not installed; tests and
doctests price formats with a fixed device profile, not with timings of a busy machine, and ``tune``
times no training steps unless a test asks for it (``measure_speed=True``): the measured step race
(:mod:`autoprec.verify._step_speed`) may change what ships, and a test's decisions must not hang on timings."""

import importlib.util
import os

import pytest

collect_ignore = [path for path, pkg in (("autoprec/integrations/lightning.py", "lightning"),
                                         ("autoprec/integrations/hf.py", "transformers"))
                  if importlib.util.find_spec(pkg) is None]

#: ``autoprec calibrate --threads 1 --dtypes fp16,bf16 --out tests/data/cpu_profile.json`` on an Intel
#: Xeon with AMX (AVX512-BF16): a CPU where BF16 is faster than FP32 for large matmuls, slower for small.
PINNED_CPU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "cpu_profile.json")


@pytest.fixture(autouse=True, scope="session")
def _pinned_device_profile(tmp_path_factory):
    """Every tune in the suite prices formats with fixed profiles, so that its decisions do not depend
    on wall-clock time: CPU targets with ``PINNED_CPU``, CUDA targets with the built-in estimate's
    roofline without per-call costs (every 16-bit matmul layer faster, however small: the tests of
    CUDA targets check numerical decisions on small models; tests of the cost model pass their
    profile). Any calibration caches into a temporary directory. ``$AUTOPREC_MEASURE_SPEED=0``: tune's
    step timing is off by default (a test that checks it passes ``measure_speed=True``)."""
    from autoprec.device import compute_bound
    from autoprec.device import save_profile

    cuda = str(tmp_path_factory.mktemp("profiles") / "cuda_no_call_costs.json")
    save_profile(compute_bound(device="test GPU: roofline, no per-call costs"), cuda)
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOPREC_PROFILE", os.pathsep.join([PINNED_CPU, cuda]))
    mp.setenv("AUTOPREC_MEASURE_SPEED", "0")
    mp.setenv("AUTOPREC_CACHE_DIR", str(tmp_path_factory.mktemp("autoprec-cache")))
    yield
    mp.undo()
