"""Tests of stage 2, probe (``autoprec/probe/``)."""
