"""The store's keys for one sweep: a digest of everything that determines each entry.

Contents, not paths: checkpoints, tokenizer sources and chat templates enter by their
fingerprints, prompts by their ids (a hash of their text), scorers by their own.
"""

from typing import Dict, List, Optional

from expo_eval.config import SamplingConfig, SweepConfig
from expo_eval.prompts import Prompt
from expo_eval.records import Split
from expo_eval.store import digest


def plain_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """The candidate's own distribution, which KL is measured on: temperature 1, no top-k/top-p,
    no penalties; the paper's settings' length limit, seed and batch size."""
    return sampling.model_copy(
        update={"temperature": 1.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    )


class Keys:
    def __init__(self, config: SweepConfig, recipe_text: str, inputs: Dict[str, Optional[str]],
                 splits: Dict[Split, List[Prompt]], chat_template: Optional[str]):
        self.config, self.recipe_text, self.inputs = config, recipe_text, inputs
        self.splits, self.chat_template = splits, chat_template
        self.models = {name: value for name, value in inputs.items() if not name.startswith("scorer ")}

    def generation(self, alpha: Optional[float], split: Split) -> str:
        config = self.config
        return digest(
            {
                "recipe": self.recipe_text,
                "inputs": self.models,  # checkpoint and chat-template contents, not their paths
                "alpha": alpha,
                "split": split,  # a row records its split: a report row is never a select row
                "prompts": [p.id for p in self.splits[split]],
                "chat_template": self.chat_template,  # the text prompts are rendered with
                "sampling": config.sampling.model_dump(),
                "backend": config.backend,
                "device": config.device,
                "max_model_len": config.engine.max_model_len,  # can cut prompts and responses
                "materialize": config.materialize,
            }
        )

    def kl_prompts(self) -> List[Prompt]:
        return self.splits["select"][: self.config.kl_prompts]

    def kl_samples(self, alpha: float) -> str:
        """The candidate's own generation key, the prompts, plain sampling."""
        return digest({
            "candidate": self.generation(alpha, "select"),
            "prompts": [p.id for p in self.kl_prompts()],
            "sampling": plain_sampling(self.config.sampling).model_dump(),
        })

    def scores(self, alpha: Optional[float], split: Split, scorer: str) -> str:
        return f"{self.generation(alpha, split)}.{digest({'scorer': scorer, 'contents': self.inputs[f'scorer {scorer}']})}"

    def cacheable(self, scorer: str) -> bool:
        """A scorer passed in as an object without a fingerprint has no key: its scores are not kept."""
        return self.inputs[f"scorer {scorer}"] is not None

    def judge(self, judge_fingerprint: str, alpha: float, split: Split) -> str:
        return digest({"judge": judge_fingerprint, "candidate": self.generation(alpha, split),
                       "baseline": self.generation(0.0, split)})

    def capability(self, alpha: float, tasks: dict) -> str:
        return digest({"recipe": self.recipe_text, "inputs": self.models, "alpha": alpha, "tasks": tasks})
