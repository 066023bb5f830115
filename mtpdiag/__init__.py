"""mtpdiag: measure how multi-token-prediction heads help or hurt an RL objective."""
from .model import GPT, GPTConfig, GPTOutput, HeadPrediction

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "GPTOutput", "HeadPrediction", "__version__"]
