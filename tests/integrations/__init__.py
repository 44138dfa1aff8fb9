"""Tests of Lightning and Hugging Face (``autoprec/integrations/``)."""
