"""Tests of device profiles and the cost model (``autoprec/device/``)."""
