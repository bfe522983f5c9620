"""Extras: methods beside the card's core (RLOO, online DPO, WPO). They import the core, never the reverse.
Each runs as a script (python extras/rloo.py ...) or as a module (python -m extras.rloo ...)."""
