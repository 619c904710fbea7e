"""Deprecated alias of :mod:`attnrhythm.generation` (the module moved); removed in the next release."""
from attnrhythm.errors import moved_module

moved_module(__name__, "attnrhythm.generation")
