"""Tests of stage 5, the runtime (eager, compiled, emulated) (``autoprec/runtime/``)."""
