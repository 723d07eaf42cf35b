"""Builders for the messages between roles (larpo_ray.types), shared by the tests: a prompt, a
candidate, a scored candidate and a ranked list, each with the fewest arguments a test needs."""

from larpo_ray.types import Candidate, Prompt, RankedList, ScoredCandidate

# A run in the test's own process: no Ray, HF generate, one learner worker (CLI overrides).
IN_PROCESS = ["--resources.use_ray", "false", "--generation.engine", "hf", "--learner.num_workers", "1"]
TINY_IN_PROCESS = ["--preset", "tiny", *IN_PROCESS]


def prompt(uid: str = "p", token_ids: tuple[int, ...] = (1, 2), question: str | None = None, answer=None) -> Prompt:
    """A prompt; with `question`, a ChatML-templated single user turn that judges can read."""
    if question is None:
        return Prompt(uid=uid, text=f"q {uid}", token_ids=token_ids, answer=answer)
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return Prompt(uid=uid, text=text, token_ids=token_ids, messages=(("user", question),), answer=answer)


def candidate(
    uid: str = "p", token_ids: tuple[int, ...] = (1,), text: str = "", logp: float | None = None, version: int = 0
) -> Candidate:
    """A sampled response; `logp` fills one sampling log-prob per token (none by default)."""
    logps = () if logp is None else (logp,) * len(token_ids)
    return Candidate(uid, token_ids, text, logps, 1.0, version)


def scored(uid: str, token_ids: tuple[int, ...], reward: float, iteration: int = 0, text: str = "") -> ScoredCandidate:
    return ScoredCandidate(candidate(uid, token_ids, text, version=iteration), reward, iteration)


def ranked(prompt_ids: tuple[int, ...], responses: list[tuple[int, ...]], uid: str = "p") -> RankedList:
    """A list of `responses` to one prompt, best first (rewards 0, -1, -2, ...)."""
    cands = tuple(scored(uid, r, float(-j)) for j, r in enumerate(responses))
    return RankedList(Prompt(uid=uid, text="", token_ids=prompt_ids), cands, tuple(c.reward for c in cands))
