"""The demo's synthetic instruction task, in two shapes: short answers and long ones.

Short (`describe cat river lamp`): one to four nouns, one sentence `the NOUN is
ADJECTIVE .` each, at most 21 tokens. Long (`detail cat river`): two nouns, each
described by an opening sentence and then one sentence per aspect in a fixed
order (`its color is ADJECTIVE .` ... ten aspects), 111 tokens: the regime where
a chat model's KL from its SFT model is nats, not hundredths.
The prompt's verb says which shape is asked for.

The programmatic ground truth (`ground_truth`, usable as the scorer
`expo_eval.demo.task:ground_truth`) gives +1, 0 or -1 per well-placed sentence
for a positive, neutral or negative adjective, and -1 for every sentence that is
malformed, out of place, about another noun or a repeat, for every requested
noun or aspect left out, and for an unfinished answer. The SFT data picks
adjectives uniformly, so the SFT model is neutral on average and preference
learning has something to find: positive adjectives, in a well-formed answer that ends.
"""

import random
from dataclasses import dataclass
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
ASPECTS = tuple("color size mood voice smell shape taste sound age home".split())


@dataclass(frozen=True)
class Shape:
    """What a prompt asks for: its verb, how many nouns, the aspect sentences after each opening."""

    verb: str
    nouns: Tuple[int, int]
    aspects: Tuple[str, ...]

    def prompt_text(self, nouns: Sequence[str]) -> str:
        return " ".join((self.verb, *nouns))

    def sample_nouns(self, rng: random.Random) -> "Nouns":
        return tuple(rng.sample(NOUNS, rng.randint(*self.nouns)))


SHORT = Shape("describe", (1, 4), ())
LONG = Shape("detail", (2, 2), ASPECTS)
SHAPES = {"short": SHORT, "long": LONG}
WORDS = ["the", "is", "its", ".", *(shape.verb for shape in SHAPES.values()), *ASPECTS] + NOUNS + list(ADJECTIVES)

Nouns = Tuple[str, ...]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """mergekit_expo.tiny's tokenizer over the task's words (both shapes).

    Its template ends an assistant turn with EOS, and a rendered prompt is an exact
    token prefix of prompt + answer (whitespace pre-tokenization), as TRL needs; the
    dedicated pad token lets a sequence classifier find each sequence's end.
    """
    return tiny.build_tokenizer(WORDS)


def shape_of(prompt: str) -> Shape:
    words = prompt.split()
    return next((shape for shape in SHAPES.values() if words[:1] == [shape.verb]), SHORT)


def requested_nouns(prompt: str) -> List[str]:
    words = prompt.split()
    return words[1:] if words[:1] and words[0] in {shape.verb for shape in SHAPES.values()} else []


def sentence(noun: str, adjective: str, aspect: str = "") -> str:
    return f"its {aspect} is {adjective} ." if aspect else f"the {noun} is {adjective} ."


def reference_answer(nouns: Sequence[str], rng: random.Random, shape: Shape = SHORT) -> str:
    """A well-formed answer with adjectives drawn uniformly: the SFT data."""
    adjectives = list(ADJECTIVES)
    return " ".join(
        sentence(noun, rng.choice(adjectives), aspect) for noun in nouns for aspect in ("", *shape.aspects)
    )


def judge(prompt: str, response: str) -> Tuple[float, int]:
    """(the well-placed sentences' adjective values summed, the number of faults).

    A noun's block is its opening sentence, then each of its aspects once (the SFT data keeps
    them in one order; any order counts, so one slip costs one sentence, not the rest of the
    block). A fault: a requested noun or one of its aspects left out, or a sentence that is
    malformed, about a noun not asked for, a repeat, outside a block, or unfinished.
    """
    shape = shape_of(prompt)
    wanted = requested_nouns(prompt)
    *finished, unfinished = " ".join(response.split()).split(".")
    value, faults, described = 0.0, 0, set()
    aspects_left: set = set()  # the current noun's aspects not yet described
    for text in finished:
        parts = text.split()
        if len(parts) != 4 or parts[2] != "is" or parts[3] not in ADJECTIVES:
            faults += 1
        elif parts[0] == "the" and parts[1] in wanted and parts[1] not in described:
            faults += len(aspects_left)
            described.add(parts[1])
            aspects_left = set(shape.aspects)
            value += ADJECTIVES[parts[3]]
        elif parts[0] == "its" and parts[1] in aspects_left:
            aspects_left.remove(parts[1])
            value += ADJECTIVES[parts[3]]
        else:
            faults += 1
    faults += len(aspects_left) + bool(unfinished.strip())
    faults += len(set(wanted) - described) * (1 + len(shape.aspects))
    return value, faults


def ground_truth(prompt: str, response: str) -> float:
    """The task's true reward (the scorer `expo_eval.demo.task:ground_truth`): value - faults."""
    value, faults = judge(prompt, response)
    return value - faults


def well_formed(prompt: str, response: str) -> bool:
    return judge(prompt, response)[1] == 0


def unique_noun_sets(
    rng: random.Random, count: int, shape: Shape = SHORT, exclude: frozenset = frozenset()
) -> List[Nouns]:
    """`count` distinct noun tuples, none in `exclude` (held-out prompt sets never overlap)."""
    seen, result = set(exclude), []
    while len(result) < count:
        nouns = shape.sample_nouns(rng)
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


def off_order(answer: str, rng: random.Random) -> str:
    """Two sentences swapped: every word kept, the order broken."""
    sentences = [text.strip() + " ." for text in answer.split(".") if text.strip()]
    if len(sentences) > 1:
        i, j = rng.sample(range(len(sentences)), 2)
        sentences[i], sentences[j] = sentences[j], sentences[i]
    return " ".join(sentences)


def duplicated(answer: str, rng: random.Random) -> str:
    return " ".join([answer] * rng.randint(2, 4))


def word_salad(answer: str, rng: random.Random) -> str:
    words = answer.split()
    rng.shuffle(words)
    return " ".join(words)


CORRUPTIONS = (truncated, rambling, duplicated, word_salad, off_order)


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
