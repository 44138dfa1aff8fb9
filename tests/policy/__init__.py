"""Tests of stage 4, the policy and its file (``autoprec/policy/``)."""
