"""An LLM judge behind any OpenAI-compatible chat endpoint (`vllm serve`, llama.cpp's server, a
hosted API): pairwise against alpha = 0, in both orders, scored as alpaca_eval scores.

The prompt is one of alpaca_eval's own annotator templates (default: the one behind AlpacaEval
2.0's classifier, which answers `m` or `M`), read from the installed package; the win rate is
alpaca_eval's `get_winrate`. Its length-controlled win rate (`length_controlled_v1`) needs the
AlpacaEval instruction-difficulty table from the Hub and only covers its 805 instructions, so the
LC win rate here is alpaca_eval's `length_controlled_minimal` formula, fitted locally: a logistic
regression of the preference on tanh(standardized length difference), read at no difference.
"""

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from mergekit_expo.errors import ExpoError

# alpaca_eval's preference encoding: 1 the baseline (output_1) wins, 2 the candidate wins, 1.5 a tie.
BASELINE_WINS, CANDIDATE_WINS, TIE = 1.0, 2.0, 1.5
# The template's fields, substituted in one pass (an output that contains "{output_2}" stays as it is).
FIELDS = re.compile(r"\{(instruction|output_1|output_2)\}")
# A verdict resting on fewer answers than this share of the prompts is flagged.
MIN_PARSED_SHARE = 0.9


class JudgeError(ExpoError, RuntimeError):
    """The judge cannot be reached or does not answer in the template's format."""


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vllm serve).")
    model: str = Field(description="The judge model's name at that endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (local servers: any value).")
    template: str = Field("alpaca_eval_clf_gpt4_turbo", description="alpaca_eval annotator whose prompt template the judge gets.")
    max_retries: int = Field(6, ge=0, description="Retries per request, with exponential backoff (429, 5xx, timeouts).")
    timeout_s: float = Field(120.0, gt=0, description="Seconds per request.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")


class JudgeStats(BaseModel):
    """The judge's verdict on one candidate against alpha = 0 on the same prompts (percent)."""

    judge: str
    n: int
    win_rate: float
    win_rate_stderr: float
    lc_win_rate: float
    position_agreement: float  # share of prompts where both orders gave the same winner
    unparsed: int = 0  # prompts left out: an answer in either order was not `m` or `M`


def template_text(name: str) -> str:
    """The annotator's prompt template, from alpaca_eval's installed configs."""
    import yaml
    from alpaca_eval.constants import EVALUATORS_CONFIG_DIR

    config_path = EVALUATORS_CONFIG_DIR / name / "configs.yaml"
    if not config_path.is_file():
        raise JudgeError(f"alpaca_eval has no annotator {name!r} (looked in {EVALUATORS_CONFIG_DIR})")
    config = yaml.safe_load(config_path.read_text())[name]
    parser = config.get("completion_parser_kwargs") or {}
    if parser.get("denominator_tokens") != ["m", "M"] or (config.get("completions_kwargs") or {}).get("max_tokens") != 1:
        raise JudgeError(
            f"alpaca_eval annotator {name!r} does not answer with one token, m or M; the judge reads only those "
            "(e.g. alpaca_eval_clf_gpt4_turbo, weighted_alpaca_eval_gpt4_turbo)"
        )
    return (EVALUATORS_CONFIG_DIR / config["prompt_template"]).read_text()


class Judge:
    """Asks the judge which of two outputs is better, once in each order."""

    def __init__(self, config: JudgeConfig):
        try:
            from openai import OpenAI
        except ImportError:
            raise JudgeError("the LLM judge needs alpaca-eval and openai: pip install 'mergekit-expo[judge]'") from None
        self.config = config
        self.template = template_text(config.template)
        self.api_key = os.environ.get(config.api_key_env) or None
        self.client = OpenAI(
            base_url=config.base_url,
            api_key=self.api_key or "none",  # a local server takes any key; one that refuses it hears why (_reason)
            max_retries=config.max_retries,
            timeout=config.timeout_s,
        )

    def check(self) -> None:
        """Before any generation: the endpoint answers and serves the judge model."""
        from openai import OpenAIError

        try:
            raw = self.client.models.with_raw_response.list()
        except OpenAIError as error:
            raise JudgeError(f"judge endpoint {self.config.base_url}: {self._reason(error)}") from None
        listing = self._parsed(raw.content, "/models", hint=" (is --judge-base-url the API's root, e.g. http://127.0.0.1:8000/v1?)")
        models = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
            raise self._malformed("/models", "has no `data` list of models, each with an `id`", raw.content)
        served = [m["id"] for m in models]
        if served and self.config.model not in served:
            raise JudgeError(f"judge endpoint {self.config.base_url} does not serve {self.config.model!r} (it serves {', '.join(served)})")

    @property
    def fingerprint(self) -> dict:
        """What a cached verdict depends on: the judge (endpoint and model) and the exact prompt."""
        return {"base_url": self.config.base_url, "model": self.config.model, "template": self.template}

    def _ask(self, instruction: str, output_1: str, output_2: str) -> Optional[str]:
        """'1' or '2' (the better output), None for an answer outside the template's format."""
        from alpaca_eval.utils import prompt_to_chatml
        from openai import OpenAIError

        values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
        prompt = FIELDS.sub(lambda match: values[match.group(1)], self.template)
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.config.model, messages=prompt_to_chatml(prompt), max_tokens=1, temperature=0
            )
        except OpenAIError as error:
            raise JudgeError(
                f"judge {self.config.model} at {self.config.base_url} failed (up to {self.config.max_retries} "
                f"retries for timeouts, 429 and 5xx): {self._reason(error)}"
            ) from None
        return {"m": "1", "M": "2"}.get(self._content(raw.content).strip())

    def _content(self, body: bytes) -> str:
        """The first choice's message text ("" for none) of a chat completion's raw reply."""
        route = "/chat/completions"
        reply = self._parsed(body, route)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list):
            raise self._malformed(route, "has no `choices` list", body)
        if not choices:
            raise self._malformed(route, "has an empty `choices` list", body)
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        if not isinstance(message, dict):
            raise self._malformed(route, "has no `message` in its first choice", body)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise self._malformed(route, "has a `message.content` that is not text", body)
        return content or ""

    def _parsed(self, body: bytes, route: str, hint: str = ""):
        """A reply's JSON, read here rather than by the openai client, which hands back a
        non-JSON body as a string and a malformed one as a half-built object."""
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise self._malformed(route, "is not UTF-8 text", body) from None
        except ValueError:
            raise self._malformed(route, "is not JSON" + hint, body) from None

    def _malformed(self, route: str, problem: str, body: bytes) -> JudgeError:
        start = body.decode("utf-8", errors="replace")[:200]
        return JudgeError(f"judge endpoint {self.config.base_url}: its reply to {route} {problem}: {start!r}")

    def _reason(self, error) -> str:
        """The client's error, and for a refused request (401, 403) what is wrong with the key."""
        from openai import AuthenticationError, PermissionDeniedError

        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, (AuthenticationError, PermissionDeniedError)):
            variable = self.config.api_key_env
            if self.api_key is None:
                return f"it refused the request ({reason}): --judge-api-key-env {variable} is not set; set it to the endpoint's API key"
            return f"it refused the key in {variable} ({reason})"
        return reason

    def preferences(
        self, instructions: Sequence[str], baseline: Sequence[str], candidate: Sequence[str]
    ) -> List[Optional[float]]:
        """Per prompt, alpaca_eval's preference for the candidate over the baseline, from both
        orders: a win only when both agree, a tie when they disagree, None when unparsable."""
        jobs = [(i, b, c) for i, b, c in zip(instructions, baseline, candidate)]
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            forward = list(pool.map(lambda job: self._ask(job[0], job[1], job[2]), jobs))
            backward = list(pool.map(lambda job: self._ask(job[0], job[2], job[1]), jobs))
        return [_combine(f, b) for f, b in zip(forward, backward)]


def _combine(forward: Optional[str], backward: Optional[str]) -> Optional[float]:
    """forward: the candidate was output_2; backward: it was output_1."""
    if forward is None or backward is None:
        return None
    candidate_first = forward == "2"
    candidate_second = backward == "1"
    if candidate_first and candidate_second:
        return CANDIDATE_WINS
    if not candidate_first and not candidate_second:
        return BASELINE_WINS
    return TIE


def summarize(
    preferences: Sequence[Optional[float]], baseline: Sequence[str], candidate: Sequence[str], judge: str
) -> JudgeStats:
    """alpaca_eval's win rate, and the locally fitted length-controlled win rate."""
    import pandas as pd
    from alpaca_eval.metrics import get_winrate

    rows = [(p, b, c) for p, b, c in zip(preferences, baseline, candidate) if p is not None]
    if not rows:
        raise JudgeError(f"judge {judge} gave no answer in the template's format (m or M)")
    annotations = pd.DataFrame({"preference": [p for p, _, _ in rows]})
    metrics = get_winrate(annotations)
    stderr = float(metrics["standard_error"])
    return JudgeStats(
        judge=judge,
        n=len(rows),
        win_rate=float(metrics["win_rate"]),
        win_rate_stderr=stderr if math.isfinite(stderr) else 0.0,  # one prompt: no spread, as for scores
        lc_win_rate=length_controlled_win_rate(rows),
        position_agreement=sum(p != TIE for p, _, _ in rows) / len(rows),
        unparsed=len(preferences) - len(rows),
    )


def length_controlled_win_rate(rows) -> float:
    """alpaca_eval's `length_controlled_minimal` GLM: P(candidate wins) = sigmoid(w * tanh(d) + b),
    d the length difference (characters, candidate - baseline) over its standard deviation, and
    the LC win rate is the prediction at d = 0. Ties count half a win in each direction."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    delta = np.array([len(c) - len(b) for _, b, c in rows], dtype=float)
    spread = delta.std()
    feature = np.tanh(delta / spread) if spread > 0 else np.zeros_like(delta)
    wins = np.array([p - 1.0 for p, _, _ in rows])  # in [0, 1]
    if wins.min() == wins.max():  # all wins or all losses: no model to fit
        return float(100 * wins[0])
    x = np.concatenate([feature, feature])[:, None]
    y = np.concatenate([np.ones_like(wins), np.zeros_like(wins)])
    weight = np.concatenate([wins, 1 - wins])
    model = LogisticRegression(C=1e6).fit(x, y, sample_weight=weight)
    return float(100 * model.predict_proba(np.zeros((1, 1)))[0, 1])
