"""prefopt: a config-driven runner for preference optimization (DPO, EXPO, HPO and baselines)."""

from pathlib import Path

__version__ = "0.1.0"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the Hydra config groups: the one place it is named
