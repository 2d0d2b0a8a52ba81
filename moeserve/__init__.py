"""moeserve: distributed serving for DeepSeek-style Mixture-of-Experts language models."""

__version__ = "0.1.0"
