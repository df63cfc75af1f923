"""prefopt: a config-driven runner for preference optimization (DPO, EXPO, HPO and baselines)."""

__version__ = "0.1.0"
