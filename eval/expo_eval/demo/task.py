"""The demo's synthetic instruction task: "describe these nouns".

A prompt names one to four nouns (`describe cat river lamp`); a well-formed
answer has one sentence per noun, `the NOUN is ADJECTIVE .`. The programmatic
ground truth (`ground_truth`, usable as the scorer `expo_eval.demo.task:ground_truth`)
gives +1, 0 or -1 per described noun for a positive, neutral or negative
adjective, and -1 for every requested noun left out and every sentence that is
malformed, about another noun, or a repeat. The SFT data picks adjectives
uniformly, so the SFT model is neutral on average and preference learning has
something to find: positive adjectives, in a well-formed answer that ends.
"""

import random
from typing import Dict, List, Sequence, Tuple

from transformers import PreTrainedTokenizerFast

from mergekit_expo import tiny

NOUNS = (
    "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse rabbit "
    "frog duck owl snake tree flower river lake hill road house garden city village "
    "boat car train bridge book lamp chair table door window"
).split()
POSITIVE = "happy bright kind lovely cheerful gentle brave clever friendly beautiful".split()
NEUTRAL = "old small large brown quiet round tall plain wooden distant".split()
NEGATIVE = "sad dirty broken angry ugly lazy noisy rotten cruel gloomy".split()
ADJECTIVES: Dict[str, int] = {
    **dict.fromkeys(POSITIVE, 1),
    **dict.fromkeys(NEUTRAL, 0),
    **dict.fromkeys(NEGATIVE, -1),
}
VERB = "describe"
WORDS = [VERB, "the", "is", "."] + NOUNS + list(ADJECTIVES)
MAX_NOUNS = 4

Nouns = Tuple[str, ...]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """mergekit_expo.tiny's tokenizer over the task's words.

    Its template ends an assistant turn with EOS, and a rendered prompt is an exact
    token prefix of prompt + answer (whitespace pre-tokenization), as TRL needs; the
    dedicated pad token lets a sequence classifier find each sequence's end.
    """
    return tiny.build_tokenizer(WORDS)


def prompt_text(nouns: Sequence[str]) -> str:
    return " ".join((VERB, *nouns))


def requested_nouns(prompt: str) -> List[str]:
    words = prompt.split()
    return words[1:] if words[:1] == [VERB] else []


def sentence(noun: str, adjective: str) -> str:
    return f"the {noun} is {adjective} ."


def reference_answer(nouns: Sequence[str], rng: random.Random) -> str:
    """A well-formed answer with adjectives drawn uniformly: the SFT data."""
    adjectives = list(ADJECTIVES)
    return " ".join(sentence(noun, rng.choice(adjectives)) for noun in nouns)


def judge(prompt: str, response: str) -> Tuple[float, int]:
    """(the described nouns' adjective values summed, the number of faults).

    A fault: a requested noun left out, or a sentence that is malformed, about a
    noun not asked for, a repeat, or unfinished.
    """
    wanted = requested_nouns(prompt)
    *finished, unfinished = " ".join(response.split()).split(".")
    value, faults, described = 0.0, 0, set()
    for text in finished:
        parts = text.split()
        if (
            len(parts) == 4
            and parts[0] == "the"
            and parts[1] in wanted
            and parts[1] not in described
            and parts[2] == "is"
            and parts[3] in ADJECTIVES
        ):
            described.add(parts[1])
            value += ADJECTIVES[parts[3]]
        else:
            faults += 1
    faults += bool(unfinished.strip()) + len(set(wanted) - described)
    return value, faults


def ground_truth(prompt: str, response: str) -> float:
    """The task's true reward (the scorer `expo_eval.demo.task:ground_truth`): value - faults."""
    value, faults = judge(prompt, response)
    return value - faults


def well_formed(prompt: str, response: str) -> bool:
    return judge(prompt, response)[1] == 0


def sample_nouns(rng: random.Random) -> Nouns:
    return tuple(rng.sample(NOUNS, rng.randint(1, MAX_NOUNS)))


def unique_noun_sets(rng: random.Random, count: int, exclude: frozenset = frozenset()) -> List[Nouns]:
    """`count` distinct noun tuples, none in `exclude` (held-out prompt sets never overlap)."""
    seen, result = set(exclude), []
    while len(result) < count:
        nouns = sample_nouns(rng)
        if nouns not in seen:
            seen.add(nouns)
            result.append(nouns)
    return result


# -- broken copies of a good answer, so the reward model learns to punish broken text ----


def truncated(answer: str, rng: random.Random) -> str:
    words = answer.split()
    return " ".join(words[: rng.randint(1, len(words) - 1)])


def rambling(answer: str, rng: random.Random) -> str:
    extra = [sentence(rng.choice(NOUNS), rng.choice(list(ADJECTIVES))) for _ in range(rng.randint(2, 6))]
    return " ".join([answer, *extra])


def duplicated(answer: str, rng: random.Random) -> str:
    return " ".join([answer] * rng.randint(2, 4))


def word_salad(answer: str, rng: random.Random) -> str:
    words = answer.split()
    rng.shuffle(words)
    return " ".join(words)


CORRUPTIONS = (truncated, rambling, duplicated, word_salad)


def format_pair(prompt: str, answer: str, rng: random.Random) -> Tuple[str, str]:
    """(chosen, rejected): the answer beats a broken copy of itself with the same adjectives.

    Only copies that the ground truth ranks lower: a truncation at a sentence end
    can drop a negative sentence and tie. Appending off-topic sentences always loses.
    """
    score = ground_truth(prompt, answer)
    for _ in range(8):
        rejected = rng.choice(CORRUPTIONS)(answer, rng)
        if ground_truth(prompt, rejected) < score:
            return answer, rejected
    return answer, rambling(answer, rng)
