"""`softserve eval`: accuracy of a model or soft prompt on a JSONL file, scored by a running server.

One example per line:
- multiple choice, scored by log-likelihood: `{"prompt": "Review: ...\\nSentiment:", "choices": [" positive",
  " negative"], "answer": 0}` (`answer` is the index or the text of the right choice). The server
  scores `prompt + choice` with `echo`, `logprobs` and `max_tokens: 0`; a choice's score is the sum of
  the logprobs of the tokens that overlap it. The highest score wins (lm-eval's `acc`).
- generation, exact match: `{"prompt": ..., "completion": " positive"}`: greedy decoding, compared
  after whitespace normalisation (the tuning jobs' eval_acc rule).

Trailing whitespace of a prompt moves to the front of each choice before scoring, as lm-eval does, so
a token boundary never falls inside the space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from softserve.client import Client, CompletionResponse, SoftserveError


class EvalDataError(ValueError):
    pass


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    choices: tuple[str, ...] = ()
    answer: int | None = None
    completion: str | None = None


@dataclass
class EvalResult:
    mode: str  # "choices", "exact_match" or "mixed"
    correct: int
    total: int
    predictions: list[str]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "mode": self.mode}


def parse_eval_line(obj, where: str) -> EvalItem:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise EvalDataError(f"{where}: expected an object with a non-empty string 'prompt'")
    if "choices" in obj:
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalDataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        answer = obj.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise EvalDataError(f"{where}: 'answer' must be an index into 'choices' or one of them")
        return EvalItem(prompt=obj["prompt"], choices=tuple(choices), answer=answer)
    if isinstance(obj.get("completion"), str):
        return EvalItem(prompt=obj["prompt"], completion=obj["completion"])
    raise EvalDataError(f"{where}: needs 'choices' + 'answer' or 'completion'")


def load_eval_data(path: str | Path) -> list[EvalItem]:
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from exc
        items.append(parse_eval_line(obj, f"{path}, line {number}"))
    if not items:
        raise EvalDataError(f"{path}: no examples")
    return items


def _complete(client: Client, model: str, prompt: str | list[str], **params) -> CompletionResponse:
    try:
        return client.complete(model, prompt, **params)
    except SoftserveError as exc:
        if exc.status_code is None:
            raise RuntimeError(f"no answer from the server: {exc.message}") from None
        raise RuntimeError(f"server answered {exc.status_code}: {exc.message}") from None


def choice_scores(client: Client, model: str, item: EvalItem) -> list[float]:
    """Sum of logprobs of each choice given the prompt (one request for all choices)."""
    context = item.prompt.rstrip()
    moved = item.prompt[len(context):]
    texts = [context + moved + choice for choice in item.choices]
    response = _complete(client, model, texts, echo=True, logprobs=0, max_tokens=0, temperature=0)
    scores = [0.0] * len(texts)
    for choice in response.choices:
        lp = choice.logprobs
        boundary = len(context)
        total = 0.0
        for token, logprob, offset in zip(lp.tokens, lp.token_logprobs, lp.text_offset):
            if offset + len(token) > boundary and logprob is not None:
                total += logprob
        scores[choice.index] = total
    return scores


def evaluate(client: Client, model: str, items: list[EvalItem], max_tokens: int = 32) -> EvalResult:
    from softserve.tuning.trainer import exact_match

    correct, predictions = 0, []
    kinds = set()
    for item in items:
        if item.choices:
            kinds.add("choices")
            scores = choice_scores(client, model, item)
            best = max(range(len(scores)), key=scores.__getitem__)
            predictions.append(item.choices[best])
            correct += int(best == item.answer)
        else:
            kinds.add("exact_match")
            text = _complete(client, model, item.prompt, max_tokens=max_tokens, temperature=0).choices[0].text
            predictions.append(text)
            correct += int(exact_match(text, item.completion))
    mode = kinds.pop() if len(kinds) == 1 else "mixed"
    return EvalResult(mode=mode, correct=correct, total=len(items), predictions=predictions)
