"""eval_winrate.py and rlhfkit/judges.py: Wilson interval by hand, verdict parsing and order combination, the API
judge against a small HTTP server on 127.0.0.1 (timeouts, malformed replies, HTTP errors, bounded retries, the key
never leaked), and the stage end to end with the API judge and with a reward model from disk."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import eval_winrate
from rlhfkit.cli import parse_args
from rlhfkit.errors import UserError
from rlhfkit.eval.judges import ApiJudge, JudgeError, combine_orders, judge_messages, parse_verdict

torch.set_num_threads(1)
SECRET = "sk-test-0123456789-secret"


# ---------------------------------------------------------------------------------------------------------------
# statistics and protocol (pure)
# ---------------------------------------------------------------------------------------------------------------
def test_wilson_interval_by_hand():
    # 5/10 at 95%: z = 1.959964; centre = 0.5; half = z/(1 + z²/10)·sqrt(0.025 + z²/400) = 0.26340
    low, high = eval_winrate.wilson_interval(5, 10, 0.95)
    assert (low, high) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 0/10: the upper end is z²/(n + z²) = 3.841459 / 13.841459
    assert eval_winrate.wilson_interval(0, 10, 0.95) == pytest.approx((0.0, 0.277533), abs=1e-6)


def test_summary_counts_ties_as_half():
    summary = eval_winrate.summarize(["win", "win", "tie", "loss", None], 0.95)
    counts = (summary["wins"], summary["ties"], summary["losses"], summary["judged"], summary["errors"])
    assert counts == (2, 1, 1, 4, 1)
    assert summary["win_rate"] == pytest.approx(2.5 / 4)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(eval_winrate.wilson_interval(2.5, 4, 0.95))
    empty = eval_winrate.summarize([None], 0.95)
    assert empty["win_rate"] is None and empty["errors"] == 1
    json.dumps(empty, allow_nan=False)


def test_verdicts_and_both_orders():
    assert parse_verdict("A is clearer.\n[[A]]") == "A"
    assert parse_verdict("I first thought [[A]] but on reflection [[ b ]]") == "B"
    assert parse_verdict("[[C]]") == "tie" and parse_verdict("[[tie]]") == "tie"
    assert parse_verdict("Response A is better") is None
    # (verdict with A shown first, verdict with A shown second) → score of A
    assert combine_orders("A", "B") == 1.0  # A preferred in both positions
    assert combine_orders("B", "A") == 0.0
    assert combine_orders("A", "A") == 0.5  # always the first position: pure position bias cancels to a tie
    assert combine_orders("A", "tie") == 0.75
    messages = judge_messages("harmless", [{"role": "user", "content": "hi"}], "one", "two")
    text = messages[1]["content"]
    assert "harmless" in text and text.index("one") < text.index("two")
    with pytest.raises(UserError):
        judge_messages("funny", [], "a", "b")


# ---------------------------------------------------------------------------------------------------------------
# a local OpenAI-compatible judge server
# ---------------------------------------------------------------------------------------------------------------
class JudgeServer:
    """Serves /v1/chat/completions on 127.0.0.1. `script` holds behaviours for the next requests (then `default`):
    judge (prefers the response containing GOOD), first (always [[A]]), timeout, not_json, no_choices, no_verdict,
    http500, http429, http401, echo_auth (HTTP 400 echoing the Authorization header)."""

    def __init__(self):
        self.script: list[str] = []
        self.default = "judge"
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body})
                    behaviour = server.script.pop(0) if server.script else server.default
                if behaviour == "timeout":
                    time.sleep(1.0)
                    behaviour = "judge"
                if behaviour.startswith("http"):
                    code = int(behaviour[4:])
                    self._send(code, b'{"error": {"message": "server says no"}}')
                elif behaviour == "echo_auth":
                    echo = {"error": f"bad request from {self.headers.get('Authorization')}"}
                    self._send(400, json.dumps(echo).encode())
                elif behaviour == "not_json":
                    self._send(200, b"<html>gateway error</html>")
                elif behaviour == "no_choices":
                    self._send(200, b'{"object": "chat.completion", "choices": []}')
                else:
                    user = body["messages"][-1]["content"]
                    a = user.split("<response_a>")[1].split("</response_a>")[0]
                    b = user.split("<response_b>")[1].split("</response_b>")[0]
                    if behaviour == "no_verdict":
                        verdict = "Both responses are fine."
                    elif behaviour == "first":
                        verdict = "The first one.\n[[A]]"
                    else:
                        better_a, better_b = "GOOD" in a and "GOOD" not in b, "GOOD" in b and "GOOD" not in a
                        verdict = "[[A]]" if better_a else "[[B]]" if better_b else "[[C]]"
                    reply = {"choices": [{"message": {"role": "assistant", "content": f"Reasoning.\n{verdict}"}}]}
                    self._send(200, json.dumps(reply).encode())

            def _send(self, code, payload):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    instance = JudgeServer()
    yield instance
    instance.close()


def _judge(server, monkeypatch, **kwargs):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    options = {"api_key_env": "JUDGE_KEY", "timeout": 0.4, "max_retries": 2, "backoff": 0.0}
    options.update(kwargs)
    return ApiJudge(server.url, "judge-model", **options)


PROMPT = [{"role": "user", "content": "Say something nice."}]


def test_api_judge_asks_both_orders_with_the_key(server, monkeypatch):
    judge = _judge(server, monkeypatch)
    result = judge.judge_pair(PROMPT, "GOOD answer", "poor answer")
    assert result["outcome"] == "win" and result["score"] == 1.0 and result["consistent"]
    assert (result["verdict_a_first"], result["verdict_b_first"]) == ("A", "B")
    assert len(server.requests) == 2
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    first, second = (r["body"]["messages"][-1]["content"] for r in server.requests)
    assert first.index("GOOD answer") < first.index("poor answer")
    assert second.index("poor answer") < second.index("GOOD answer")
    assert server.requests[0]["body"]["model"] == "judge-model"
    assert SECRET not in repr(judge) and SECRET not in json.dumps(judge.describe())


def test_position_bias_cancels_to_a_tie(server, monkeypatch):
    server.default = "first"
    result = _judge(server, monkeypatch).judge_pair(PROMPT, "GOOD answer", "poor answer")
    assert result["outcome"] == "tie" and not result["consistent"]


def test_identical_responses_are_a_tie_without_asking(server, monkeypatch):
    result = _judge(server, monkeypatch).judge_pair(PROMPT, "same", "same")
    assert result["outcome"] == "tie" and result["identical"] and server.requests == []


@pytest.mark.parametrize("behaviour", ["timeout", "not_json", "no_choices", "no_verdict", "http500", "http429"])
def test_transient_failures_are_retried(server, monkeypatch, behaviour):
    server.script = [behaviour]
    verdict, _ = _judge(server, monkeypatch).ask(judge_messages("helpful", PROMPT, "GOOD", "bad"))
    assert verdict == "A"
    assert len(server.requests) == 2  # one failure, one retry


@pytest.mark.parametrize("behaviour,message", [
    ("timeout", "no reply within 0.4 s"),
    ("not_json", "reply is not JSON"),
    ("no_choices", "no choices[0].message.content"),
    ("no_verdict", "no verdict marker"),
    ("http500", "HTTP 500"),
])
def test_persistent_failures_give_up_after_bounded_retries(server, monkeypatch, behaviour, message):
    server.default = behaviour
    judge = _judge(server, monkeypatch, max_retries=2)
    started = time.monotonic()
    with pytest.raises(JudgeError) as info:
        judge.ask(judge_messages("helpful", PROMPT, "GOOD", "bad"))
    text = str(info.value)
    assert message in text and "gave up after 3 attempts" in text and server.url in text
    assert "\n" not in text and SECRET not in text
    assert len(server.requests) == 3
    assert time.monotonic() - started < 5


def test_client_errors_are_not_retried_and_never_leak_the_key(server, monkeypatch):
    server.default = "http401"
    with pytest.raises(JudgeError, match=r"HTTP 401.*\$JUDGE_KEY") as info:
        _judge(server, monkeypatch).ask(judge_messages("helpful", PROMPT, "a", "b"))
    assert len(server.requests) == 1 and SECRET not in str(info.value)
    server.default = "echo_auth"
    with pytest.raises(JudgeError, match="HTTP 400") as info:
        _judge(server, monkeypatch).ask(judge_messages("helpful", PROMPT, "a", "b"))
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_unreachable_endpoint(monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = ApiJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=0.5, max_retries=1, backoff=0.0)
    with pytest.raises(JudgeError, match="cannot connect.*gave up after 2 attempts"):
        judge.ask(judge_messages("helpful", PROMPT, "a", "b"))


def test_skip_mode_records_failures(server, monkeypatch):
    server.default = "no_verdict"
    results = _judge(server, monkeypatch, max_retries=0, on_error="skip").judge([PROMPT], ["a"], ["b"], progress=False)
    assert results[0]["outcome"] is None and "no verdict marker" in results[0]["error"]


# ---------------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------------
def _write_generations(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _prompt(i):
    return [{"role": "user", "content": f"Tell me something about topic {i}."}]


def _generations(tmp_path):
    # GOOD marks the better response: A alone on prompts 0-2 (A wins), B alone on 3 (B wins), both on 4 (tie)
    a_good = {0, 1, 2, 4}
    b_good = {3, 4}
    rows_a = [{"id": str(i), "prompt": _prompt(i), "responses": [f"{'GOOD' if i in a_good else 'meh'} reply {i}", "x"],
               "meta": {}} for i in range(5)]
    rows_b = [{"id": str(i), "prompt": _prompt(i), "responses": [f"{'GOOD' if i in b_good else 'meh'} answer {i}"]}
              for i in reversed(range(6))]  # other order, one extra prompt
    gen_a = _write_generations(tmp_path / "gen-a" / "generations.jsonl", rows_a)
    gen_b = _write_generations(tmp_path / "gen-b.jsonl", rows_b)
    return gen_a, gen_b


def _run(argv):
    return eval_winrate.main(*parse_args(eval_winrate.ARGUMENTS, argv))


@pytest.mark.slow  # runs the stage's main to the end
def test_stage_with_api_judge(tmp_path, server, monkeypatch, capsys):
    gen_a, gen_b = _generations(tmp_path)
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    out = tmp_path / "winrate"
    summary = _run(["--responses_a", str(gen_a.parent), "--responses_b", str(gen_b), "--output_dir", str(out),
                    "--judge_api_base", server.url, "--judge_model", "judge-model", "--judge_api_key_env", "JUDGE_KEY",
                    "--judge_template", "harmless", "--judge_timeout", "5", "--judge_concurrency", "2"])
    # prompts 0-2: A wins; 3: B wins; 4: both GOOD → tie
    assert (summary["wins"], summary["ties"], summary["losses"]) == (3, 1, 1)
    assert summary["win_rate"] == pytest.approx(3.5 / 5)
    assert summary["order_consistency"] == 1.0
    assert len(server.requests) == 10  # 5 pairs × 2 orders
    report = json.loads((out / "winrate.json").read_text())
    assert report["matching"] == {"matched_by": "id", "matched": 5, "only_in_a": 0, "only_in_b": 1}
    assert (report["a"]["name"], report["b"]["name"]) == ("gen-a", "gen-b")
    assert report["judge"]["template"] == "harmless"
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert [j["id"] for j in judgments] == ["0", "1", "2", "3", "4"]
    assert [j["outcome"] for j in judgments] == ["win", "win", "win", "loss", "tie"]
    assert json.loads((out / "run_info.json").read_text())["complete"]
    printed = capsys.readouterr().out
    assert "A wins" in printed and "Wilson" in printed
    for file in out.iterdir():  # the key is in no output file
        assert SECRET not in file.read_text(errors="replace")
    assert not (tmp_path / "winrate.partial").exists()


@pytest.mark.slow  # runs the stage's main to the end
def test_stage_with_reward_model_judge(tmp_path):
    from rlhfkit.models import ensure_pad_token, load_reward_model, load_tokenizer, resolve_model
    from rlhfkit.scoring import score_conversations

    base, _ = resolve_model("tiny-random-llama")
    tokenizer = load_tokenizer(base)
    model = load_reward_model(base, new_head=True)
    ensure_pad_token(tokenizer, model)
    rm_dir = tmp_path / "rm"
    model.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    gen_a, gen_b = _generations(tmp_path)
    out = tmp_path / "winrate-rm"
    summary = _run(["--responses_a", str(gen_a), "--responses_b", str(gen_b), "--output_dir", str(out),
                    "--reward_model_path", str(rm_dir), "--match_by", "prompt", "--name_a", "more",
                    "--name_b", "multitask"])
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    expected_a = score_conversations(model.eval(), tokenizer,
                                     [_prompt(i) + [{"role": "assistant", "content": j["response_a"]}]
                                      for i, j in enumerate(judgments)])
    assert [j["reward_a"] for j in judgments] == pytest.approx(expected_a, abs=1e-5)
    for j in judgments:
        gap = j["reward_a"] - j["reward_b"]
        assert j["outcome"] == ("win" if gap > 0 else "loss" if gap < 0 else "tie")
    assert summary["judged"] == 5 and summary["wins"] + summary["ties"] + summary["losses"] == 5
    report = json.loads((out / "winrate.json").read_text())
    assert report["matching"]["matched_by"] == "prompt"
    assert (report["a"]["name"], report["b"]["name"]) == ("more", "multitask")

    # the same file against itself: every pair is a tie, win rate exactly ½
    same = _run(["--responses_a", str(gen_a), "--responses_b", str(gen_a), "--output_dir", str(tmp_path / "same"),
                 "--reward_model_path", str(rm_dir)])
    assert same["ties"] == 5 and same["win_rate"] == 0.5


def test_stage_input_errors(tmp_path, server):
    gen_a, gen_b = _generations(tmp_path)
    common = ["--judge_api_base", server.url, "--judge_model", "m", "--output_dir", str(tmp_path / "o")]
    bad = _write_generations(tmp_path / "bad.jsonl", [{"id": "0", "prompt": _prompt(99), "responses": ["GOOD"]}])
    with pytest.raises(UserError, match=r"bad.jsonl: row 1: field 'prompt': id '0' has a different prompt"):
        _run(["--responses_a", str(gen_a), "--responses_b", str(bad), *common])
    with pytest.raises(UserError, match=r"gen-b.jsonl: row 1: field 'responses': has 1 responses, --response_index 1"):
        _run(["--responses_a", str(gen_a), "--responses_b", str(gen_b), "--response_index", "1", *common])
    with pytest.raises(UserError, match="no generations.jsonl"):
        _run(["--responses_a", str(tmp_path), "--responses_b", str(gen_b), *common])
    with pytest.raises(UserError, match="exactly one judge"):
        _run(["--responses_a", str(gen_a), "--responses_b", str(gen_b), "--output_dir", str(tmp_path / "o")])
    other = _write_generations(tmp_path / "other.jsonl", [{"id": "x", "prompt": _prompt(50), "responses": ["a"]}])
    with pytest.raises(UserError, match="share no prompts"):
        _run(["--responses_a", str(gen_a), "--responses_b", str(other), *common])
    assert server.requests == []
