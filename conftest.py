"""Doctest collection skips the integrations whose optional framework is not installed."""

import importlib.util

collect_ignore = [path for path, pkg in (("autoprec/integrations/lightning.py", "lightning"),
                                         ("autoprec/integrations/hf.py", "transformers"))
                  if importlib.util.find_spec(pkg) is None]
