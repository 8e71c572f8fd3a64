"""privtune.eval.winrate: pairwise win rate of model A over model B on a set of instructions.

    privtune winrate --models runs/dp3 smollm2-135m --instructions prompts.jsonl [--judge SPEC] [--json]

- ``inputs``   the instructions file and the two models (a run dir's trained model, or a model name/path)
- ``parts``    append-only JSONL part files keyed by what produced them (resume, any number of processes)
- ``answers``  batched greedy answers, sharded across ranks, written as they are generated
- ``judges``   the judges: ``reference`` (programmatic), ``lm:MODEL`` (logprobs of two choice tokens),
  ``openai:URL[#model]`` (an OpenAI-compatible endpoint)
- ``judging``  every instruction judged in both orders, each verdict written as it is made
- ``stats``    per-instruction scores, win rate, bootstrap CI, position consistency, length-controlled win rate
- ``run``      the command itself: answers, judgments, ``winrate.json`` and the summary

Sensitive: the answers of a model trained on private data may repeat that data, so they are as private as the
training set. They stay in the output folder's part files; ``winrate.json`` holds verdicts, lengths and counts,
never answer text. The ``openai:`` judge sends instructions and both answers to its endpoint: point it only at a
server allowed to see them (a local one, typically).
"""

from privtune.eval.winrate.run import WinrateSettings, run_winrate

__all__ = ["WinrateSettings", "run_winrate"]
