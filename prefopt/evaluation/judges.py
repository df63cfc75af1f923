"""A pairwise LLM judge through any OpenAI-compatible chat endpoint, and win-rate intervals.

The papers' GPT-4 evaluation (DPO §6, HPO §5): show the judge a prompt and two responses, ask which is more
helpful and harmless. Judges prefer whichever response comes first (or second), so every row is asked in
both orders and the two verdicts are averaged: `p_first` is 1.0 (first wins both), 0.5 (split, or an answer
that could not be parsed) or 0.0. Answers are cached on disk, so re-running an evaluation costs nothing.

Only the standard library speaks HTTP (urllib.request): POST {base_url}/chat/completions, the key read from
an environment variable, so the same code talks to OpenAI, vLLM or a llama.cpp server. Each request has a
connect timeout, a read timeout and a deadline over all its retries: an endpoint that accepts connections
but never answers fails within `deadline_s`, naming itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefopt.config.schemas import DEFAULT_TEMPLATE, LLMJudgeConfig  # noqa: F401 (re-exported)
from prefopt.files import DamagedFile, atomic_write_json, read_sealed_json, sealed
from prefopt.progress import progress

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge's endpoint refused a request, or kept failing after all retries."""


def parse_answer(text: str | None) -> str | None:
    """'A' or 'B' from a judge's answer ("A", "b.", "**B**", "Response A", "More helpful: A"); else None."""
    if not text:
        return None
    clean = re.sub(r"[*_`\"'()\[\].:!]", " ", text).strip()
    if clean.upper() in ("A", "B"):
        return clean.upper()
    lead = re.match(r"(?:response|answer|option|output)\s*-?\s*([ab])\b", clean, re.IGNORECASE)
    lead = lead or re.match(r"([AB])\b", clean)  # "A, because ..." (a lowercase "a" here is the article)
    if lead:
        return lead.group(1).upper()
    # Otherwise one letter named: "Response B" anywhere, or a capital standing alone (not the article "a").
    named = set(re.findall(r"\bresponse\s+([ab])\b", clean, re.IGNORECASE))
    named = named or set(re.findall(r"\b([AB])\b", clean))
    return named.pop().upper() if len(named) == 1 else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefopt" / "judge"


class LLMJudge:
    """`compare(prompts, first, second)` -> per row {"p_first", "answers", "parsed"}, both orders asked.

    Cache directory: `cfg.cache_dir` when set, else the `cache_dir` argument (the eval stage passes
    <run dir>/judge_cache), else ~/.cache/prefopt/judge. One JSON file per request, named by the sha256 of
    (base_url, model, temperature, max_tokens, template, the filled prompt), its record sealed with a sha256
    of itself: a damaged record is deleted and asked again (one warning naming the file); a cache dir that
    cannot be written is one warning per judge, and the answers go uncached.
    """

    def __init__(self, cfg: LLMJudgeConfig, cache_dir: Path | None = None):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.cache_dir = Path(cfg.cache_dir or cache_dir or default_cache_dir())
        self.requests = 0  # HTTP requests made (attempts included), for logs and tests
        self._lock = threading.Lock()
        self._unwritable = False  # the cache dir refused a write (warned once)

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[dict]:
        if not len(prompts) == len(first) == len(second):
            raise ValueError(
                f"lengths differ: {len(prompts)} prompts, {len(first)} first, {len(second)} second"
            )
        rows = list(zip(prompts, first, second))
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            try:
                out = list(progress(pool.map(self._judge_row, rows), total=len(rows), desc="llm judge"))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # one refused row fails the call: send no more requests
                raise
        log.info("llm judge: %d rows, %d HTTP requests so far", len(rows), self.requests)
        unparsed = sum(p is None for row in out for p in row["parsed"])
        if unparsed:
            log.warning("llm judge: %d of %d answers unparseable, counted as ties", unparsed, 2 * len(rows))
        return out

    def _judge_row(self, row: tuple[str, str, str]) -> dict:
        prompt, first, second = row
        answers = [self.ask(prompt, first, second), self.ask(prompt, second, first)]
        parsed = [parse_answer(a) for a in answers]
        # Order 1 shows `first` as A, order 2 as B; an unparseable answer is a tie for that order.
        wins = [{"A": 1.0, "B": 0.0}.get(parsed[0], 0.5), {"A": 0.0, "B": 1.0}.get(parsed[1], 0.5)]
        return {"p_first": sum(wins) / 2, "answers": answers, "parsed": parsed}

    def ask(self, prompt: str, response_a: str, response_b: str) -> str:
        """The judge's raw answer for one order, from the cache or the endpoint."""
        content = self.cfg.template.format(prompt=prompt, response_a=response_a, response_b=response_b)
        path = self.cache_dir / f"{self._key(content)}.json"
        cached = self._cached(path)
        if cached is not None:
            return cached
        answer = self._post(content)
        record = sealed({"answer": answer, "model": self.cfg.model, "base_url": self.cfg.base_url})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, record, indent=None)
        except OSError as error:
            with self._lock:
                warn, self._unwritable = not self._unwritable, True
            if warn:
                log.warning("llm judge: cannot write to %s (%s); answers not cached", path.parent, error)
        return answer

    def _cached(self, path: Path) -> str | None:
        """The answer recorded in `path`; None when absent, or (deleted, with a warning) when damaged."""
        if not path.exists():
            return None
        try:
            answer = read_sealed_json(path).get("answer")
            if isinstance(answer, str):
                return answer
            raise DamagedFile(f"{path}: damaged (no answer)")
        except (DamagedFile, OSError) as error:
            log.warning("llm judge cache: %s; deleting it and asking again", error)
            with contextlib.suppress(OSError):  # best effort: the cache may be read-only
                path.unlink(missing_ok=True)
            return None

    def _key(self, content: str) -> str:
        c = self.cfg
        fields = [c.base_url.rstrip("/"), c.model, c.temperature, c.max_tokens, c.template, content]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def _post(self, content: str) -> str:
        c = self.cfg
        body = {
            "model": c.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(c.api_key_env) if c.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        deadline = time.monotonic() + c.deadline_s
        for attempt in range(c.max_retries + 1):
            with self._lock:
                self.requests += 1
            left = deadline - time.monotonic()
            opener = timed_opener(min(c.connect_timeout_s, left), min(c.read_timeout_s, left))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with opener.open(request) as response:
                    return _answer_of(json.loads(response.read()), self.url)
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read().decode(errors="replace").replace("\n", " ")[:200]
                    raise JudgeError(f"llm judge: HTTP {e.code} from {self.url}: {detail}") from None
                error, retry_after = f"HTTP {e.code}", _seconds(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error, retry_after = f"{type(e).__name__}: {getattr(e, 'reason', e)}", 0.0
            if attempt == c.max_retries:
                break
            delay = max(c.backoff_s * 2**attempt * (1 + 0.1 * random.random()), retry_after)
            if time.monotonic() + delay >= deadline:
                raise JudgeError(
                    f"llm judge: {self.url} gave no answer within eval.generation.llm.deadline_s="
                    f"{c.deadline_s:g} ({attempt + 1} attempts, last: {error}); check the endpoint, or raise "
                    "deadline_s / read_timeout_s"
                )
            log.warning(
                "llm judge: %s from %s; retry %d/%d in %.1fs",
                error,
                self.url,
                attempt + 1,
                c.max_retries,
                delay,
            )
            time.sleep(delay)
        raise JudgeError(f"llm judge: {self.url} failed after {c.max_retries + 1} attempts, last: {error}")


def timed_opener(connect_s: float, read_s: float) -> urllib.request.OpenerDirector:
    """A urllib opener (proxies as usual) whose connections open within `connect_s` and then wait at most
    `read_s` for each read; urllib's own `timeout` is one number for both."""

    def timed(base: type) -> type:
        class Timed(base):
            def connect(self):
                self.timeout = connect_s
                super().connect()
                self.sock.settimeout(read_s)

        return Timed

    class Handler:
        def do_open(self, http_class, request, **kwargs):
            return super().do_open(timed(http_class), request, **kwargs)

    class HTTP(Handler, urllib.request.HTTPHandler):
        pass

    class HTTPS(Handler, urllib.request.HTTPSHandler):
        pass

    return urllib.request.build_opener(HTTP(), HTTPS())


def _answer_of(reply: dict, url: str) -> str:
    try:
        return reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"llm judge: no choices[0].message.content in the reply from {url}") from None


def _seconds(value: str | None) -> float:
    try:
        return min(float(value), 60.0) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: fall back to the exponential back-off


def win_rate_interval(p: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high) of per-row win probabilities, a z-sided interval clipped to [0, 1].

    Wilson score interval when every value is 0 or 1 (sound near 0 and 1, where the normal one collapses);
    otherwise, as with ties of 0.5, the normal approximation mean ± z * s / sqrt(n) with the sample std s.
    A single row gives no spread: (mean, 0, 1).
    """
    n = len(p)
    if n == 0:
        raise ValueError("win_rate_interval of no rows")
    mean = sum(p) / n
    if n == 1:
        return mean, 0.0, 1.0
    if all(v in (0.0, 1.0) for v in p):
        centre = (mean + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z / (1 + z**2 / n) * math.sqrt(mean * (1 - mean) / n + z**2 / (4 * n**2))
    else:
        s = math.sqrt(sum((v - mean) ** 2 for v in p) / (n - 1))
        centre, half = mean, z * s / math.sqrt(n)
    return mean, max(0.0, centre - half), min(1.0, centre + half)
