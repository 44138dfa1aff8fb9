"""Tests of stage 7, the report (``autoprec/report/``)."""
