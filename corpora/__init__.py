"""privtune.corpora: datasets with gold sensitive spans, and tokenization with per-token sensitive masks.

Owns everything between a ``DataConfig`` and the tokenized splits training and evaluation read:

- ``records``       the data model: ``Span``, ``Record``, ``Canary``, ``Corpus``; span checks
- ``customersim``   customer-service dialogs with Faker PII (Paper A's CustomerSim), gold spans
- ``synbio``        synthetic biographies (Paper A's SynBio), gold spans
- ``canaries``      Secret Sharer canaries, planted in the training split only
- ``userdata``      the user's .jsonl / .csv / ``datasets`` directory, spans given or detected
- ``detect``        the regex detector for data without spans
- ``build``         ``build_corpus(cfg)``: source + canaries -> ``Corpus``
- ``splits``        ``split_corpus``: seeded train/test split, by user when there are users
- ``tokenization``  ``tokenize``: token ids + sensitive masks via offset mappings
- ``prepared``      ``save_prepared`` / ``load_prepared``: the run directory's ``data/`` folder

Privacy unit: the record (one example), or the user named by ``data.group_by``. Sensitive: the characters inside
spans, and any token overlapping them; every file written here holds raw personal data.
"""

from privtune.corpora.build import build_corpus
from privtune.corpora.detect import detect_spans
from privtune.corpora.prepared import PreparedData, load_prepared, save_prepared
from privtune.corpora.records import Canary, Corpus, Record, Span
from privtune.corpora.splits import split_corpus
from privtune.corpora.tokenization import TokenizedExample, TokenizedSplit, sensitive_mask, tokenize

__all__ = [
    "Canary", "Corpus", "PreparedData", "Record", "Span", "TokenizedExample", "TokenizedSplit", "build_corpus",
    "detect_spans", "load_prepared", "save_prepared", "sensitive_mask", "split_corpus", "tokenize",
]
