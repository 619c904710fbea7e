"""The paper's analyses: ``analyze`` (rhythm metrics, couplings), ``perturb`` (Table 1),
``reproduce`` (every claim with a verdict), and their ``figures`` and HTML ``report``."""
