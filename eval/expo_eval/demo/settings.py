"""What a demo run is (its settings, the regimes and their quick versions) and where its files live."""

from pathlib import Path
from typing import Literal, Tuple

from pydantic import BaseModel, ConfigDict

# Reward models per run, each from its own half of the reward pairs and its own seed: the
# independent scorers that the trust-region rule averages, and that an ensemble needs.
REWARD_MODELS = ("a", "b")


class DemoSettings(BaseModel):
    """Everything that determines the demo's results; the defaults are the full run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    # which answers the task asks for (expo_eval.demo.task.SHAPES)
    shape: Literal["short", "long"] = "short"
    # tiny llama: width, layers, feed-forward width (about 0.88M parameters)
    model_size: Tuple[int, int, int] = (128, 4, 384)
    # gentle SFT: 20k examples made DPO's later checkpoints unstable under extrapolation
    sft_examples: int = 10000
    # A long-shape SFT first trains on this many short answers (batch 64), then on its own examples
    # with `copy_examples` short ones mixed in: one epoch of long answers alone, or mixed with
    # short ones, learned the format but not to copy the prompt's nouns.
    curriculum_examples: int = 0
    copy_examples: int = 0
    # training truncation, in tokens: above the longest prompt + answer
    max_length: int = 64
    sft_learning_rate: float = 1e-3
    sft_batch_size: int = 64
    # prompts sampled twice by the SFT model; pairs with equal ground truth are dropped
    pair_prompts: int = 10000
    pair_max_new_tokens: int = 32
    reward_learning_rate: float = 1e-4
    reward_batch_size: int = 32
    dpo_pairs: int = 8000
    # TRL's default 1e-6 barely moves a model this small. At 5e-5 the best alpha was at most
    # 0.5 for every checkpoint (the path curves early); 2e-5 still improves DPO throughout.
    dpo_learning_rate: float = 2e-5
    dpo_beta: float = 0.1
    dpo_batch_size: int = 32
    dpo_warmup: float = 0.1
    fractions: Tuple[float, ...] = (0.1, 0.2, 0.4, 1.0)
    # every alpha is evaluated on both: 256 each keeps the main job within its time
    dev_prompts: int = 256
    test_prompts: int = 256
    alphas: Tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    # the longest well-formed answer is 21 tokens with EOS
    max_new_tokens: int = 32
    sample_batch_size: int = 256


SHORT = DemoSettings()
# Long answers (90-150 tokens): the regime of chat models, where KL(theta1 || theta0) is nats.
# Fewer, longer examples: a sequence costs about six short ones to train on and to sample.
LONG = DemoSettings(
    shape="long",
    curriculum_examples=10000,
    sft_examples=3000,
    copy_examples=3000,
    sft_batch_size=32,
    max_length=160,
    pair_prompts=2000,
    pair_max_new_tokens=128,
    # About 700 pairs each: batch 8 gives the reward models the short regime's number of steps
    # (at batch 32 both scored every long answer alike).
    reward_batch_size=8,
    dpo_pairs=2000,
    # 5e-5 left nothing for ExPO to gain (every alpha above 0 was worse by the ground truth)
    dpo_learning_rate=2e-5,
    dpo_batch_size=16,
    dev_prompts=128,
    test_prompts=128,
    alphas=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    # a well-formed answer is 111 tokens with EOS
    max_new_tokens=128,
    sample_batch_size=128,
)
REGIMES = {"short": SHORT, "long": LONG}
FULL_SEEDS = (0, 1, 2)  # the evidence on choosing alpha; the main job runs seed 0
QUICK_SHORT = DemoSettings(
    model_size=(64, 2, 128),
    sft_examples=2000,
    sft_batch_size=32,
    pair_prompts=600,
    dpo_pairs=320,
    dpo_batch_size=16,
    dev_prompts=16,
    test_prompts=16,
    alphas=(0.5, 2.0, 8.0),
)
QUICK = {
    "short": QUICK_SHORT,
    "long": QUICK_SHORT.model_copy(
        update=dict(
            shape="long", curriculum_examples=400, sft_examples=100, copy_examples=100, max_length=160,
            pair_prompts=120, pair_max_new_tokens=64, dpo_pairs=64, max_new_tokens=64, alphas=(2.0,),
            # 16 DPO steps: with 4, the 10% and 20% saves fall on step 1, whose warmup learning rate is 0
            dpo_batch_size=4,
        )
    ),
}


def checkpoint_name(fraction: float) -> str:
    return f"p{round(fraction * 100)}"


class Layout:
    """Where every artifact of a demo run lives under DIR."""

    def __init__(self, root: Path):
        self.root = root
        self.task = root / "task"
        self.sft = root / "sft"
        self.pairs = root / "pairs"
        self.reward_models = [root / "reward_models" / name for name in REWARD_MODELS]
        self.dpo = root / "dpo"
        self.recipes = root / "recipes"
        self.sweeps = root / "sweeps"
        self.stages = root / "stages"
        self.report = root / "report.md"
        self.summary = root / "summary.json"
        self.plots = root / "plots"

    def reward_pairs(self, index: int) -> Path:
        return self.pairs / f"reward_{REWARD_MODELS[index]}.jsonl"

    def checkpoint(self, fraction: float) -> Path:
        return self.dpo / checkpoint_name(fraction)
