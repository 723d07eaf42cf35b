"""The remote HTTP scorer (`reward.kind = http`), and the transport the listwise judge reuses
(actors/listwise.py): session, API key from the environment, TLS, retries with backoff, redaction."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

from larpo_ray.config import RewardConfig
from larpo_ray.types import Prompt, ScorerError

log = logging.getLogger(__name__)


class HTTPScorer:
    """A remote scorer. Protocol (one POST per batch of at most `batch_size` pairs):

        POST <url>    Content-Type: application/json    [Authorization: Bearer <key>]
        {"prompts":   ["<prompt text, chat-templated for the policy>", ...],
         "messages":  [[{"role": "user", "content": "..."}, ...], ...],   # same prompts, untemplated
         "responses": ["<response text>", ...]}
        -> 200 {"scores": [0.7, -1.2, ...]}    # one number per response, same order

    Connection errors, timeouts, 5xx and 429 are retried `max_retries` times with capped exponential
    backoff plus jitter; other 4xx fail at once (the request is wrong, retrying will not help). A
    body that is not that JSON shape raises `ScorerError`. The API key is read from the env var
    named `api_key_env` (reward.api_key_env; a config holds the name, never the key), sent only as
    a header, and never logged or put in an error message. TLS certificates are verified against
    the system's CAs, or `ca_bundle` (reward.ca_bundle); verify_tls = False accepts any
    certificate and warns.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        verify_tls: bool = True,
        batch_size: int = 16,
        api_key_env: str = "LARPO_REWARD_API_KEY",
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        ca_bundle: str | None = None,
    ):
        import requests

        self.url, self.timeout_s, self.max_retries, self.verify_tls = url, timeout_s, max_retries, verify_tls
        self.batch_size, self.backoff_s, self.max_backoff_s = batch_size, backoff_s, max_backoff_s
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise ScorerError(
                f"reward.ca_bundle {ca_bundle!r} is not a file on this node: give the path of a "
                f"PEM file with the CA certificate(s) of {url}"
            )
        self.verify: bool | str = (ca_bundle or True) if verify_tls else False  # requests' `verify`
        if not verify_tls:
            log.warning(
                "reward.verify_tls = false: the reward server %s is not authenticated, so anyone on the "
                "network path can read the API key and forge scores; set reward.ca_bundle to its CA "
                "certificate instead",
                url,
            )
        self._session = requests.Session()
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key:
            self._session.headers["Authorization"] = f"Bearer {self._api_key}"

    @classmethod
    def from_config(cls, cfg: RewardConfig, trust_remote_code: bool = False) -> HTTPScorer:
        return cls(
            cfg.url,
            cfg.timeout_s,
            cfg.max_retries,
            cfg.verify_tls,
            cfg.batch_size,
            cfg.api_key_env,
            ca_bundle=cfg.ca_bundle,
        )

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: give one prompt per response")
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            ps, rs = prompts[start : start + self.batch_size], list(responses[start : start + self.batch_size])
            payload = {
                "prompts": [p.text for p in ps],
                "responses": rs,
                "messages": [[{"role": r, "content": c} for r, c in p.messages] for p in ps],
            }
            scores += self._post(payload, len(rs))
        return scores

    def _post(self, payload: dict, n: int) -> list[float]:
        """One batch, with retries on the failures that can be transient."""
        import requests

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            try:
                resp = self._session.post(self.url, json=payload, timeout=self.timeout_s, verify=self.verify)
            except requests.exceptions.SSLError as err:  # a certificate will not fix itself: no retry
                raise ScorerError(
                    f"reward server {self.url}: TLS verification failed ({self._redact(err)}); "
                    f"fix the server's certificate, or point reward.ca_bundle at the PEM of the "
                    f"CA that signed it (for a self-signed server: its certificate)"
                ) from None
            except requests.Timeout:
                last = f"timed out after reward.timeout_s = {self.timeout_s} s"
                continue
            except requests.ConnectionError as err:
                last = f"connection failed: {self._redact(err)}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {self._redact(resp.text)[:200]}"
                continue
            if resp.status_code >= 400:
                raise ScorerError(
                    f"reward server {self.url} rejected the request with HTTP {resp.status_code} "
                    f"({self._redact(resp.text)[:200]}); check the URL, the API key in the env "
                    f"and that the server speaks the HTTPScorer protocol"
                )
            return self._parse(resp, n)
        raise ScorerError(
            f"reward server {self.url} is down or too slow: {self.max_retries + 1} attempts failed, "
            f"last: {last}. Check that it is running and reachable from this node, or raise "
            f"reward.timeout_s / reward.max_retries"
        )

    def _parse(self, resp, n: int) -> list[float]:
        """Validate the `{"scores": [...]}` body; anything else is the server's bug, named."""
        where = f"reward server {self.url} (HTTP {resp.status_code})"
        try:
            body = resp.json()
        except ValueError:
            raise ScorerError(
                f"{where} returned a body that is not JSON: {self._redact(resp.text)[:100]!r}; "
                f'expected {{"scores": [...]}}'
            ) from None
        scores = body.get("scores") if isinstance(body, dict) else None
        if not isinstance(scores, list):
            raise ScorerError(f'{where} returned {self._redact(body)[:100]!r}; expected {{"scores": [...]}}')
        if len(scores) != n:
            raise ScorerError(f"{where} returned {len(scores)} scores for {n} responses; expected one per response")
        bad = next((s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float))), None)
        if bad is not None:
            raise ScorerError(
                f"{where} returned a non-numeric score {self._redact(bad)[:50]!r}; scores must be numbers"
            )
        return [float(s) for s in scores]

    def _redact(self, text: object) -> str:
        """Servers and exceptions may echo headers back: the key never leaves this object."""
        return str(text).replace(self._api_key, "***") if self._api_key else str(text)
