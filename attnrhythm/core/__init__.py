"""The method itself: pure tensor functions, no I/O and no model.

``config`` (every constant), ``stats`` (what capture produces), ``heads`` (local/global/receiver
heads), ``metrics`` (WAAD, FAI, delta), ``topq`` (TopQ selection), ``credit`` (gamma per credit
strategy and the registry of strategies), ``couplings`` (Table 2 statistics), ``textstats``
(content-word Jaccard, bootstrap intervals).  See docs/method.md for the formulas.
"""
