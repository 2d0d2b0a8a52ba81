"""The test checkpoints' tokenizer: a byte-level BPE of ``VOCAB_SIZE`` tokens trained on a few standard-library
modules' sources and some non-ASCII text, with BOS/EOS as ids 0/1 and a minimal chat template.

Public API:
    train_tokenizer(out_dir, vocab_size=320) -> Path (tokenizer.json + tokenizer_config.json)
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
VOCAB_SIZE = 320

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_CORPUS_MODULES = ("json", "textwrap", "heapq", "string", "bisect")
_NON_ASCII = "héllo wörld 你好 🙂 naïve café — «ÆØÅ» straße ½ € ✓ 日本語のテキスト Привет мир\n"


def _corpus() -> list[str]:
    """Return the fixed training corpus: a few stdlib sources plus repeated non-ASCII text."""
    texts = []
    for name in _CORPUS_MODULES:
        path = inspect.getsourcefile(importlib.import_module(name))
        assert path is not None, name
        texts.append(Path(path).read_text(encoding="utf-8"))
    texts.extend([_NON_ASCII] * 50)
    return texts


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer and save it into ``out_dir``.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos tokens, ``add_bos_token``
    true, a small jinja ``chat_template``). ``<|bos|>`` is id 0 and ``<|eos|>`` id 1; the
    vocabulary has exactly ``vocab_size`` entries. Deterministic for a given Python install.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    assert tok.token_to_id(BOS_TOKEN) == 0 and tok.token_to_id(EOS_TOKEN) == 1
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": {"content": EOS_TOKEN, "lstrip": False, "rstrip": False, "special": True},
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out_dir
