"""The offline WordPiece vocabulary of the tiny random backbones (no hub here).

Special tokens, every word of the word lists below, and single characters (with their
"##" continuations) so that any lower-case text still tokenizes without [UNK]. The
synthetic benchmarks draw their sentences from `WORD_LISTS`: a new word list is one entry
there, and both the generator and the tokenizer see it.
"""
from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

WORD_LISTS: dict[str, list[str]] = {
    "topics": ["soup", "salad", "pasta", "cake", "curry", "bread", "sushi", "pizza",
               "tacos", "ramen", "pie", "stew"],
    "flavours": ["spicy", "sweet", "smoky", "fresh", "sour", "salty", "bitter", "creamy",
                 "crispy", "tangy", "rich", "mild", "zesty", "nutty", "savory", "fruity",
                 "herbal", "buttery", "garlic", "lemon", "peppery", "minty", "earthy", "hearty"],
    "fillers": ["a", "the", "with", "and", "served", "plate", "of", "home", "made", "bowl",
                "dish", "tasty", "dinner", "lunch", "recipe", "my", "our", "today", "warm", "big"],
}
CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")


def vocabulary() -> list[str]:
    words = sorted({w for words in WORD_LISTS.values() for w in words})
    return list(dict.fromkeys(SPECIALS + words + CHARS + ["##" + c for c in CHARS]))


def offline_tokenizer():
    """A BertTokenizerFast over `vocabulary()` ([CLS] text [SEP], lower-cased)."""
    from transformers import BertTokenizerFast
    words = vocabulary()
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    else:  # 4.x reads a vocab file (and 5.x silently ignores one: hence the branch)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "vocab.txt"
            path.write_text("\n".join(words) + "\n")
            tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    if len(tok) != len(words):
        raise RuntimeError(f"offline tokenizer has {len(tok)} tokens, expected {len(words)}")
    return tok
