"""Deprecated alias of :mod:`attnrhythm.studies.perturb` (the module moved); removed in the next release."""
from attnrhythm.errors import moved_module

moved_module(__name__, "attnrhythm.studies.perturb")
