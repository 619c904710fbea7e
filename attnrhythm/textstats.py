"""Deprecated alias of :mod:`attnrhythm.core.textstats` (the module moved); removed in the next release."""
from attnrhythm.errors import moved_module

moved_module(__name__, "attnrhythm.core.textstats")
