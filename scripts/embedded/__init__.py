"""The phases of ``scripts/train_embedded.py`` (kept out of the installed ``moeserve`` package).

* ``common``: constants, the checkpoint's shape and config.json, logging;
* ``data``: the stdlib corpus, the byte-level BPE tokenizer and the token cache;
* ``model_init``: weight init, the MoE autocast adjustments, training-only dropout, the router bias update;
* ``batches``: no-cache attention metadata, random and fixed training / evaluation windows;
* ``train``: optimizer, learning-rate schedule, the training loop and evaluation;
* ``export``: the checkpoint in DeepSeek's Hugging Face names, load-back verification, greedy sampling;
* ``report``: TRAINING.md.
"""
