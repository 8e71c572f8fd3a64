"""privtune winrate: win rates of judges whose answer is known in advance, resume, failures, and the CLI.

Expectations come from the judges' definitions, not from the code's output: a judge that always prefers the first
position must give exactly 50% with no instruction position-consistent; one that always prefers A's answer, 100%;
the same model twice, a win rate whose CI covers 50%.
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from privtune.eval.winrate import WinrateSettings, run_winrate
from privtune.eval.winrate.answers import read_answers
from privtune.eval.winrate.inputs import Instruction, resolve_model
from privtune.eval.winrate.judges import OpenAIJudge, PairJudge, Verdict
from privtune.eval.winrate.parts import PARTS
from privtune.launch.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = WinrateSettings(max_new_tokens=4, batch_size=4)


def instructions(n: int, *, prefix: str = "Say something about topic") -> list[Instruction]:
    return [Instruction(id=f"q{i}", instruction=f"{prefix} {i}{'!' * (i % 3)}") for i in range(n)]


class FirstJudge(PairJudge):
    name = "always-first"

    def verdict(self, pair):
        return Verdict(choice="first")


class PrefersJudge(PairJudge):
    """Prefers whichever shown answer is one of ``favourites`` (model A's answers)."""

    name = "prefers-A"

    def __init__(self, favourites: set[str]):
        self.favourites = favourites

    def verdict(self, pair):
        first, second = pair.first in self.favourites, pair.second in self.favourites
        assert first != second, "the test needs A's and B's answers to differ"
        return Verdict(choice="first" if first else "second")


class CoinJudge(PairJudge):
    """Ignores the answers: first, second or tie at random (seeded)."""

    name = "coin"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def verdict(self, pair):
        return Verdict(choice=self.rng.choice(["first", "second", "tie"]))


class CountingJudge(PairJudge):
    """Prefers the first answer; records every call; after ``stop_after`` calls the next one is a Ctrl-C."""

    name = "counting"

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[str, str]] = []
        self.stop_after = stop_after

    def verdict(self, pair):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise KeyboardInterrupt
        self.calls.append((pair.instruction, pair.first))
        return Verdict(choice="first")


class ExplodingJudge(PairJudge):
    name = "exploding"

    def verdict(self, pair):
        if "boom" in pair.instruction:
            raise RuntimeError("judge exploded")
        return Verdict(choice="first")


@pytest.fixture(scope="module")
def llama_vs_pythia():
    # Tied-embedding tiny models at their random init repeat the prompt's last character; Pythia (untied) does
    # not, so the two answer differently.
    return resolve_model("tiny-llama"), resolve_model("tiny-pythia")


def test_a_judge_preferring_the_first_position_gives_50_percent_all_inconsistent(tmp_path, llama_vs_pythia):
    result = run_winrate(llama_vs_pythia, instructions(8), FirstJudge(), tmp_path, settings=SETTINGS)
    assert result["win_rate"] == 0.5 and result["over"] == 8 and result["instructions"] == 8
    assert result["position_consistency"] == 0.0
    assert result["outcomes"] == {"A": 0, "B": 0, "split": 8}
    assert result["ci"] == [0.5, 0.5]
    assert result["failures"]["count"] == 0
    assert json.loads((tmp_path / "winrate.json").read_text())["win_rate"] == 0.5


def test_a_judge_preferring_model_a_gives_100_percent_and_reuses_the_answers(tmp_path, llama_vs_pythia, monkeypatch):
    rows = instructions(8)
    first = run_winrate(llama_vs_pythia, rows, FirstJudge(), tmp_path, settings=SETTINGS)
    a_answers = {row["answer"] for row in read_answers(tmp_path, first["provenance"]["keys"]["answers"]["A"]).values()}

    def no_loading(*args, **kwargs):
        raise AssertionError("the answers were written already: no model should load")

    monkeypatch.setattr(type(llama_vs_pythia[0]), "load", no_loading)
    result = run_winrate(llama_vs_pythia, rows, PrefersJudge(a_answers), tmp_path, settings=SETTINGS)
    assert result["win_rate"] == 1.0 and result["over"] == 8
    assert result["position_consistency"] == 1.0
    assert result["ci"] == [1.0, 1.0]
    assert result["length_controlled_win_rate"] == 1.0
    assert result["outcomes"] == {"A": 8, "B": 0, "split": 0}


def test_identical_models_give_about_50_percent_with_the_ci_covering_it(tmp_path):
    same = resolve_model("tiny-llama")
    result = run_winrate((same, same), instructions(80), CoinJudge(seed=1), tmp_path, settings=SETTINGS)
    low, high = result["ci"]
    assert low <= 0.5 <= high
    assert abs(result["win_rate"] - 0.5) < 0.1
    assert 0.2 < result["length_controlled_win_rate"] < 0.8
    assert len(list((tmp_path / PARTS).glob("answers.*"))) == 1  # one model, one set of answers


def test_identical_models_under_an_lm_judge_give_exactly_50_percent(tmp_path):
    # With the same answer in both positions the two orders show the judge the same prompt, so any deterministic
    # judge gives the same positional verdict twice: never a win for either model.
    same = resolve_model("tiny-llama")
    from privtune.eval.winrate.judges import make_judge

    judge = make_judge("lm:tiny-llama", tie_margin=0.0, batch_size=3, timeout=1.0)
    result = run_winrate((same, same), instructions(6), judge, tmp_path, settings=SETTINGS)
    assert result["win_rate"] == 0.5 and result["over"] == 6 and result["failures"]["count"] == 0
    assert result["outcomes"]["split"] == 6
    assert 0 < result["judge_choice_mass"] <= 1


def test_an_interrupted_run_resumes_without_rejudging(tmp_path, llama_vs_pythia):
    rows = instructions(6)
    interrupted = CountingJudge(stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_winrate(llama_vs_pythia, rows, interrupted, tmp_path, settings=SETTINGS)
    assert not (tmp_path / "winrate.json").exists()
    resumed = CountingJudge()
    result = run_winrate(llama_vs_pythia, rows, resumed, tmp_path, settings=SETTINGS)
    assert len(interrupted.calls) == 5 and len(resumed.calls) == 2 * 6 - 5
    assert not set(interrupted.calls) & set(resumed.calls)  # nothing judged twice
    assert result["judged"] == 12 and result["over"] == 6 and result["win_rate"] == 0.5
    again = CountingJudge()
    run_winrate(llama_vs_pythia, rows, again, tmp_path, settings=SETTINGS)
    assert again.calls == []


def test_a_failing_judge_call_is_counted_not_dropped(tmp_path, llama_vs_pythia):
    rows = instructions(6) + [Instruction(id="b1", instruction="boom one"), Instruction(id="b2", instruction="boom 2")]
    result = run_winrate(llama_vs_pythia, rows, ExplodingJudge(), tmp_path, settings=SETTINGS)
    assert result["instructions"] == 8 and result["over"] == 6 and result["excluded"] == 2
    assert result["failures"]["count"] == 4  # both orders of both instructions
    assert result["failures"]["by_reason"] == {"judge AB: RuntimeError: judge exploded": 2,
                                               "judge BA: RuntimeError: judge exploded": 2}
    assert {f["id"] for f in result["failures"]["items"]} == {"b1", "b2"}
    assert result["win_rate"] == 0.5  # over the six judged ones


class _Endpoint(BaseHTTPRequestHandler):
    """A fake OpenAI-compatible server: the instruction's text says how to misbehave."""

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
        if "http500" in prompt:
            self.send_error(500, "boom")
            return
        if "slow" in prompt:
            time.sleep(1.0)
        content = "I cannot decide" if "chatty" in prompt else "1"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the slow reply finds its client gone (it timed out): expected, not worth a traceback


def test_openai_judge_failures_are_counted_with_their_reasons(tmp_path, llama_vs_pythia):
    server = _Server(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-model", timeout=0.3)
        rows = [*instructions(3), *(Instruction(id=w, instruction=f"{w} please") for w in ("http500", "chatty", "slow"))]
        result = run_winrate(llama_vs_pythia, rows, judge, tmp_path, settings=SETTINGS)
    finally:
        server.shutdown()
        server.server_close()
    assert result["over"] == 3 and result["win_rate"] == 0.5 and result["failures"]["count"] == 6
    reasons = {(f["id"], f["stage"]): f["reason"] for f in result["failures"]["items"]}
    assert reasons[("http500", "judge AB")].startswith("HTTP 500")
    assert reasons[("chatty", "judge BA")] == "unparseable reply: 'I cannot decide'"
    assert "timeout" in reasons[("slow", "judge AB")]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BAD_FILES = {
    "not json": (["{\"instruction\": \"hi\"}", "{oops"], "reference", "line 2 is not valid JSON"),
    "no instruction": ([{"instruction": "hi"}, {"reference": "x"}], "reference", "line 2 has no instruction"),
    "unknown field": ([{"instruction": "hi", "refrence": "x"}], "reference", "unknown field 'refrence'"),
    "reference judge without references": ([{"instruction": "hi", "reference": "x"}, {"instruction": "yo"}],
                                           "reference", "needs a reference for every instruction"),
    "unknown judge": ([{"instruction": "hi"}], "oracle", "unknown judge 'oracle'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_exits_2_with_one_line_before_any_work(tmp_path, capsys, case):
    rows, judge, needle = BAD_FILES[case]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    code = main(["winrate", "--models", "tiny-llama", "tiny-qwen", "--instructions", str(path), "--judge", judge,
                 "--out", str(out), "--json"])
    _, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("privtune: error: ") and needle in lines[0], err
    assert not out.exists()


def greedy_answer(name: str, text: str, max_new_tokens: int) -> str:
    """One prompt, unbatched, straight through transformers: the answer the reference judge should accept."""
    from privtune.trainers.models import load_model

    model, tokenizer = load_model(name)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_cli_end_to_end_with_the_reference_judge(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = ["What is two plus two?", "Name a colour.", "Longer instruction number three, please.", "Four", "Five?"]
    # A (tiny-pythia) knows the first two answers (its own greedy ones); B (tiny-llama) knows none: A wins those two
    # in both orders, the other three are both wrong (ties).
    rows = [{"id": f"t{i}", "instruction": t,
             "reference": greedy_answer("tiny-pythia", t, 6) if i < 2 else "the answer nobody gives"}
            for i, t in enumerate(texts)]
    assert all(rows[i]["reference"] for i in range(2))
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    argv = ["winrate", "--models", "tiny-pythia", "tiny-llama", "--instructions", str(path), "--judge", "reference",
            "--max-new-tokens", "6", "--batch-size", "3", "--json"]
    code = main(argv)
    out, _ = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)
    assert doc["win_rate"] == pytest.approx((1 + 1 + 0.5 * 3) / 5)
    assert doc["over"] == 5 and doc["failures"]["count"] == 0 and doc["position_consistency"] == 1.0
    assert doc["outcomes"] == {"A": 2, "B": 0, "split": 3} and doc["tie_verdicts"] == 6
    assert doc["provenance"]["models"]["A"]["spec"] == "tiny-pythia"
    saved = json.loads((tmp_path / "winrate" / "winrate.json").read_text())
    assert [r["score"] for r in saved["per_instruction"]] == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert "What is two plus two" not in (tmp_path / "winrate" / "winrate.json").read_text()

    code = main(argv[:-1])  # the human summary, from the part files: nothing answered or judged again
    out, _ = capsys.readouterr()
    assert code == 0 and "win rate of A (tiny-pythia) over B (tiny-llama): 70.0%" in out and "over 5 of 5" in out


def test_answers_of_other_settings_are_never_reused(tmp_path, llama_vs_pythia):
    rows = instructions(4)
    first = run_winrate(llama_vs_pythia, rows, FirstJudge(), tmp_path, settings=SETTINGS)
    longer = WinrateSettings(max_new_tokens=7, batch_size=4)
    second = run_winrate(llama_vs_pythia, rows, FirstJudge(), tmp_path, settings=longer)
    old, new = first["provenance"]["keys"]["answers"], second["provenance"]["keys"]["answers"]
    assert old["A"] != new["A"] and old["B"] != new["B"]
    names = {p.name.split(".")[1] for p in (tmp_path / PARTS).glob("answers.*")}
    assert names == {new["A"][:20], new["B"][:20]}  # the old answers are gone, not mixed in
    assert max(row["tokens"] for row in read_answers(tmp_path, new["A"]).values()) > 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_give_the_same_answers_and_verdicts_as_one(tmp_path):
    import os
    import subprocess
    import sys

    rows = [{"id": f"d{i}", "instruction": f"Instruction {i}{'?' * i}", "reference": "x"} for i in range(5)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["winrate", "--models", "tiny-llama", "tiny-pythia", "--instructions", str(path), "--judge", "lm:tiny-llama",
            "--max-new-tokens", "5", "--batch-size", "1", "--json"]
    one = subprocess.run([sys.executable, "-m", "privtune", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "privtune", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / d / "winrate.json").read_text()) for d in ("one", "two"))
    assert r1["provenance"]["world_size"] == 1 and r2["provenance"]["world_size"] == 2
    assert len(list((tmp_path / "two" / PARTS).glob("judgments.*.rank1.jsonl"))) == 1
    for a, b in zip(r1["per_instruction"], r2["per_instruction"], strict=True):
        assert (a["id"], a["AB"], a["BA"], a["len_a"], a["len_b"]) == (b["id"], b["AB"], b["BA"], b["len_a"], b["len_b"])
        assert a["margins"] == pytest.approx(b["margins"], abs=1e-5)
    assert r1["win_rate"] == r2["win_rate"] and r1["over"] == 5


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    from privtune.eval.winrate import stats

    # A judge that only prefers the longer answer, with A longer on half the instructions: a win rate of 50% with
    # or without length control; with equal lengths LC is the plain win rate.
    len_a, len_b = [10, 100, 30, 300, 50, 500], [100, 10, 300, 30, 500, 50]
    scores = [1.0 if a > b else 0.0 for a, b in zip(len_a, len_b, strict=True)]
    assert stats.length_controlled(scores, stats.length_feature(len_a, len_b)) == pytest.approx(0.5, abs=1e-9)
    plain = [1.0, 0.5, 0.5, 0.0, 1.0]
    assert stats.length_controlled(plain, stats.length_feature([5] * 5, [5] * 5)) == pytest.approx(0.6, abs=1e-9)
    assert [stats.instruction_score(*v) for v in [("A", "A"), ("B", "B"), ("A", "B"), ("tie", "tie"), ("A", "tie")]] \
        == [1.0, 0.0, 0.5, 0.5, 0.5]
