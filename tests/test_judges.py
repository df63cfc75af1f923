"""The pairwise LLM judge against a local imitation of /v1/chat/completions, and win-rate intervals."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefopt.config import ConfigFieldError
from prefopt.evaluation.judges import JudgeError, LLMJudge, LLMJudgeConfig, parse_answer, win_rate_interval

MARKER = "MARKER"


class FakeEndpoint:
    """Answers "A" when response A holds MARKER, else "B"; `refuse` holds statuses to send before that."""

    def __init__(self):
        self.requests: list[dict] = []  # {"path", "headers", "body"} per request
        self.refuse: list[int] = []
        self.broken = False  # reply 200 without choices
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = endpoint.refuse.pop(0) if endpoint.refuse else 200
                if status != 200:
                    self._send(status, {"error": {"message": "refused"}})
                    return
                if endpoint.broken:
                    self._send(200, {"object": "error"})
                    return
                content = body["messages"][0]["content"]
                response_a = content.split("Response A:")[1].split("Response B:")[0]
                answer = "A" if MARKER in response_a else "B"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def endpoint():
    fake = FakeEndpoint()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def judge_for(endpoint: FakeEndpoint, tmp_path, **overrides) -> LLMJudge:
    cfg = LLMJudgeConfig(base_url=endpoint.url, model="judge", backoff_s=0.01, api_key_env="PREFOPT_TEST_KEY")
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return LLMJudge(cfg, cache_dir=tmp_path / "judge_cache")


def test_both_orders_cancel_position_bias(endpoint, tmp_path):
    """The fake prefers whatever response A holds the marker, so one order alone would be biased:
    first marked, second not: A wins in order 1 and B in order 2 -> p_first = 1; the reverse -> 0;
    both or neither marked: the letter is the same in both orders -> one win each -> 0.5."""
    judge = judge_for(endpoint, tmp_path)
    prompts = ["p1", "p2", "p3", "p4"]
    first = [f"good {MARKER}", "plain", f"{MARKER} one", "plain one"]
    second = ["plain", f"good {MARKER}", f"{MARKER} two", "plain two"]
    rows = judge.compare(prompts, first, second)
    assert [r["p_first"] for r in rows] == [1.0, 0.0, 0.5, 0.5]
    assert [r["parsed"] for r in rows] == [["A", "B"], ["B", "A"], ["A", "A"], ["B", "B"]]
    assert rows[0]["answers"] == ["A", "B"]
    assert len(endpoint.requests) == 8
    request = endpoint.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "judge"
    assert request["body"]["temperature"] == 0.0 and request["body"]["max_tokens"] == 8
    assert request["body"]["messages"][0]["role"] == "user"


def test_a_second_compare_is_answered_from_the_cache(endpoint, tmp_path):
    args = (["p1", "p2"], [f"x {MARKER}", "y"], ["y", "z"])
    first_rows = judge_for(endpoint, tmp_path).compare(*args)
    assert len(endpoint.requests) == 4
    again = judge_for(endpoint, tmp_path)  # a fresh judge: the cache lives on disk, not in the object
    assert again.compare(*args) == first_rows
    assert len(endpoint.requests) == 4 and again.requests == 0
    assert len(list((tmp_path / "judge_cache").glob("*.json"))) == 4
    assert not list((tmp_path / "judge_cache").glob("*.tmp"))  # written atomically, nothing left over
    # Another judge model is another key.
    judge_for(endpoint, tmp_path, model="other").compare(*args)
    assert len(endpoint.requests) == 8


@pytest.mark.parametrize("status", [503, 429])
def test_a_refused_request_is_retried(endpoint, tmp_path, status):
    endpoint.refuse = [status, status]
    rows = judge_for(endpoint, tmp_path, concurrency=1).compare(["p"], [MARKER], ["plain"])
    assert rows[0]["p_first"] == 1.0
    assert len(endpoint.requests) == 4  # two refusals, then both orders


def test_retries_run_out_with_a_clear_error(endpoint, tmp_path):
    endpoint.refuse = [503] * 10
    with pytest.raises(JudgeError, match="failed after 3 attempts, last: HTTP 503"):
        judge_for(endpoint, tmp_path, max_retries=2, concurrency=1).compare(["p"], ["a"], ["b"])
    assert len(endpoint.requests) == 3


def test_a_client_error_fails_at_once(endpoint, tmp_path):
    endpoint.refuse = [400]
    with pytest.raises(JudgeError, match=r"HTTP 400 from http://127\.0\.0\.1:\d+/v1/chat/completions") as e:
        judge_for(endpoint, tmp_path, concurrency=1).compare(["p"], ["a"], ["b"])
    assert "\n" not in str(e.value)
    assert len(endpoint.requests) == 1


def test_a_reply_without_choices_fails_at_once(endpoint, tmp_path):
    endpoint.broken = True
    with pytest.raises(JudgeError, match="no choices"):
        judge_for(endpoint, tmp_path).ask("p", "a", "b")
    assert len(endpoint.requests) == 1


def test_an_unreachable_endpoint_is_retried_then_named(tmp_path):
    cfg = LLMJudgeConfig(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.01, read_timeout_s=2)
    with pytest.raises(JudgeError, match="127.0.0.1:9/v1/chat/completions failed after 2 attempts"):
        LLMJudge(cfg, cache_dir=tmp_path).ask("p", "a", "b")


def test_an_endpoint_that_accepts_but_never_answers_fails_at_the_deadline_naming_itself(tmp_path):
    """A listening socket that never replies (the kernel completes each connection): every attempt ends at
    the 0.5 s read timeout, and the 2 s deadline stops the retries long before max_retries=10 runs out."""
    with socket.create_server(("127.0.0.1", 0), backlog=32) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        cfg = LLMJudgeConfig(
            base_url=url,
            max_retries=10,
            backoff_s=0.01,
            read_timeout_s=0.5,
            deadline_s=2,
            connect_timeout_s=5,
        )
        judge = LLMJudge(cfg, cache_dir=tmp_path)
        with pytest.raises(JudgeError) as e:
            judge.ask("p", "a", "b")
    message = str(e.value)
    assert "\n" not in message and f"{url}/chat/completions gave no answer" in message
    assert "eval.generation.llm.deadline_s=2" in message and "timed out" in message
    assert 1 < judge.requests < 11  # the read timeout ended each attempt; the deadline ended the retries


@pytest.mark.parametrize("name", ["connect_timeout_s", "read_timeout_s", "deadline_s"])
def test_timeouts_must_be_positive(name):
    with pytest.raises(ConfigFieldError) as e:
        LLMJudgeConfig(**{name: 0})
    assert e.value.field == name


def test_the_key_is_sent_only_when_its_variable_is_set(endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFOPT_TEST_KEY", raising=False)
    judge_for(endpoint, tmp_path).ask("p", "a", "b")
    assert "Authorization" not in endpoint.requests[-1]["headers"]
    monkeypatch.setenv("PREFOPT_TEST_KEY", "sk-test")
    judge_for(endpoint, tmp_path).ask("p", "a", "c")
    assert endpoint.requests[-1]["headers"]["Authorization"] == "Bearer sk-test"


def test_an_unparseable_answer_is_a_tie_for_its_order(endpoint, tmp_path, monkeypatch):
    """Order 1 answers "A" (first wins: 1), order 2 answers "maybe" (None: 0.5) -> p_first = 0.75."""
    judge = judge_for(endpoint, tmp_path)
    answers = iter(["A", "maybe"])
    monkeypatch.setattr(judge, "_post", lambda content: next(answers))
    row = judge.compare(["p"], ["x"], ["y"])[0]
    assert row == {"p_first": 0.75, "answers": ["A", "maybe"], "parsed": ["A", None]}


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("A", "A"),
        ("b", "B"),
        (" B.\n", "B"),
        ("**A**", "A"),
        ("'B'", "B"),
        ("(A)", "A"),
        ("Response A", "A"),
        ("response b is better", "B"),
        ("Answer: b", "B"),
        ("More helpful: A", "A"),
        ("A, because it", "A"),
        ("I prefer B", "B"),
        ("a lot better", None),
        ("Both A and B", None),
        ("tie", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_answer(answer, parsed):
    assert parse_answer(answer) == parsed


def test_config_checks_the_template_and_counts():
    with pytest.raises(ValueError, match="response_b"):
        LLMJudgeConfig(template="{prompt} {response_a}")
    with pytest.raises(ConfigFieldError) as e:
        LLMJudgeConfig(max_retries=-1)
    assert e.value.field == "max_retries"


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert LLMJudge(LLMJudgeConfig()).cache_dir == tmp_path / "xdg" / "prefopt" / "judge"
    assert LLMJudge(LLMJudgeConfig(), cache_dir=tmp_path / "run").cache_dir == tmp_path / "run"
    cfg = LLMJudgeConfig(cache_dir=str(tmp_path / "mine"))
    assert LLMJudge(cfg, cache_dir=tmp_path / "run").cache_dir == tmp_path / "mine"


def test_win_rate_interval_normal_with_ties():
    """p = [1, 0.5, 0]: mean 0.5, s = sqrt((0.25 + 0 + 0.25) / 2) = 0.5,
    half = 1.96 * 0.5 / sqrt(3) = 0.565803 -> clipped to (0, 1)."""
    assert win_rate_interval([1.0, 0.5, 0.0]) == (0.5, 0.0, 1.0)
    """p = [1, 1, 1, 0.5]: mean 0.875, s = sqrt((3 * 0.015625 + 0.140625) / 3) = 0.25,
    half = 1.96 * 0.25 / 2 = 0.245 -> (0.63, 1.12 -> 1)."""
    mean, low, high = win_rate_interval([1.0, 1.0, 1.0, 0.5])
    assert mean == 0.875 and math.isclose(low, 0.63) and high == 1.0


def test_win_rate_interval_wilson_for_zero_one_data():
    """p = [1, 1, 1, 0], z = 2: n = 4, m = 0.75, z^2/n = 1, centre = (0.75 + 0.5) / 2 = 0.625,
    half = 2 / 2 * sqrt(0.75 * 0.25 / 4 + 4 / 64) = sqrt(0.109375) = 0.330719."""
    mean, low, high = win_rate_interval([1.0, 1.0, 1.0, 0.0], z=2.0)
    assert mean == 0.75
    assert math.isclose(low, 0.625 - math.sqrt(0.109375)) and math.isclose(high, 0.625 + math.sqrt(0.109375))
    """All wins, n = 4, z = 2: centre = (1 + 0.5) / 2 = 0.75, half = sqrt(0 + 1/16) = 0.25 -> (0.5, 1)."""
    assert win_rate_interval([1.0] * 4, z=2.0) == (1.0, 0.5, 1.0)
    assert win_rate_interval([0.5]) == (0.5, 0.0, 1.0)
    with pytest.raises(ValueError):
        win_rate_interval([])
