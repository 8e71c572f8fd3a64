"""privtune.eval: the evaluation stage and what it measures.

- ``scoring``     batched per-token NLL and greedy hit (teacher forcing)
- ``shards``      per-example score files: written as scoring goes, merged by index (resume, any world size)
- ``grid``        Paper A's 2x2 grid {train, test} x {sensitive, non-sensitive} and its privacy/utility readings
- ``mia``/``stats`` membership inference on whole examples and on sensitive tokens; ROC, TPR@FPR, bootstrap CIs
- ``candidates``  a canary's candidate secrets scored: shared-prefix forwards, the KV-cache digit trie
- ``exposure``    Secret Sharer canary exposure from those scores: exact ranks, or skew-normal extrapolation
- ``extraction``  greedy extraction of sensitive spans from their training prefixes
- ``measures``    runs mia / exposure / extraction inside the stage
- ``stage``       the stage itself: which models, sharding across processes, eval/metrics.json
- ``report``      the rows across runs: report.md, rows.json, rows.csv; refuses scores older than their model
- ``plots``       the report's plots: privacy vs utility, ROC per run, exposure, training curves
- ``winrate/``    ``privtune winrate``: two models answer, a judge compares each pair in both orders, win rate
                  with bootstrap CIs, position consistency, a length-controlled rate; resumable, sharded

Sensitive: per-example scores and extraction continuations come from private text and stay in the run dir;
metrics and reports hold aggregates only.
"""
