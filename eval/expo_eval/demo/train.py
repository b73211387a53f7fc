"""The demo's training stages, all with TRL: SFT, a reward model, DPO saved at fractions of an epoch.

CPU settings every TRL config here needs (trl 1.16 / transformers 5): bf16 and
gradient checkpointing off (TRL turns both on by default), no reporting, and a
float `warmup_steps` below 1 as the warm-up ratio (transformers 5 dropped
`warmup_ratio`). TRL is imported inside the functions: it is the `[demo]` extra.
"""

import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from expo_eval.demo import task
from mergekit_expo.tiny import tiny_config

Messages = List[Dict[str, str]]


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def cpu_arguments(out: Path, seed: int, **overrides) -> dict:
    """TrainingArguments shared by the three trainers: CPU, float32, one quiet epoch."""
    arguments = dict(
        output_dir=str(out / "trainer"),
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        num_train_epochs=1,
        warmup_steps=0.1,
        lr_scheduler_type="linear",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    arguments.update(overrides)
    return arguments


def fit(trainer, out: Optional[Path] = None) -> None:
    """Train, save model and tokenizer to `out` (when given), and drop the trainer's empty scratch folder."""
    trainer.train()
    if out is not None:
        trainer.save_model(str(out))
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)


def initial_model(tokenizer: PreTrainedTokenizerFast, seed: int, width: int, layers: int, ffn: int) -> LlamaForCausalLM:
    config = tiny_config(len(tokenizer), hidden_size=width, num_layers=layers, intermediate_size=ffn)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_sft(
    out: Path,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Tuple[str, str]],
    *,
    seed: int,
    size: Tuple[int, int, int],
    learning_rate: float,
    batch_size: int,
    max_length: int,
    start: Optional[Path] = None,
) -> Path:
    """SFTTrainer on (prompt, answer) pairs in chat form; loss on the answer only; from `start`'s
    weights when given, else from a seeded initialization."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": user(p), "completion": assistant(a)} for p, a in examples])
    config = SFTConfig(
        **cpu_arguments(out, seed, learning_rate=learning_rate, per_device_train_batch_size=batch_size),
        max_length=max_length,
    )
    model = LlamaForCausalLM.from_pretrained(str(start)) if start else initial_model(tokenizer, seed, *size)
    fit(SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer), out)
    return out


@torch.no_grad()
def sample(
    model_path: Path,
    prompts: Sequence[str],
    *,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 256,
    temperature: float = 1.0,
) -> List[str]:
    """One plain sample per prompt (temperature 1): the raw material of preference pairs."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_path))
    tokenizer.padding_side = "left"  # not saved with the tokenizer; right padding breaks generation
    model = LlamaForCausalLM.from_pretrained(str(model_path)).eval()
    responses: List[str] = []
    for batch, output in plain_samples(model, tokenizer, prompts, seed, max_new_tokens, batch_size, temperature):
        responses += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(r.split()) for r in responses]


def plain_samples(model, tokenizer, prompts: Sequence[str], seed: int, max_new_tokens: int, batch_size: int, temperature: float = 1.0):
    """(the rendered prompt batch, prompt + sampled response ids) per batch: pure sampling, no
    top-k/top-p, each batch seeded by its position so a batch's samples do not depend on the others."""
    for start in range(0, len(prompts), batch_size):
        torch.manual_seed(seed + start)
        chats = [user(p) for p in prompts[start : start + batch_size]]
        batch = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        )
        output = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        yield batch, output


def preference_pairs(
    prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
) -> List[Dict[str, str]]:
    """Two samples per prompt, the one with the higher ground truth chosen; ties dropped."""
    pairs = []
    for prompt, a, b in zip(prompts, first, second):
        score_a, score_b = task.ground_truth(prompt, a), task.ground_truth(prompt, b)
        if score_a != score_b:
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def chat_pairs(pairs: Sequence[Dict[str, str]]) -> List[dict]:
    return [
        {"prompt": user(p["prompt"]), "chosen": assistant(p["chosen"]), "rejected": assistant(p["rejected"])}
        for p in pairs
    ]


def format_pairs(pairs: Sequence[Dict[str, str]], seed: int) -> List[Dict[str, str]]:
    """For each pair's chosen answer that is well formed, a broken copy that it beats."""
    rng = random.Random(seed)
    result = []
    for pair in pairs:
        if task.well_formed(pair["prompt"], pair["chosen"]):
            chosen, rejected = task.format_pair(pair["prompt"], pair["chosen"], rng)
            result.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
    return result


def train_reward_model(
    out: Path,
    sft_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    pairs: Sequence[Dict[str, str]],
    *,
    seed: int,
    learning_rate: float,
    batch_size: int,
    max_length: int,
) -> Path:
    """RewardTrainer from the SFT weights: an ordinary HF scalar sequence classifier."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(
        **cpu_arguments(out, seed, learning_rate=learning_rate, per_device_train_batch_size=batch_size),
        max_length=max_length,
    )
    trainer = RewardTrainer(
        model=str(sft_path),
        args=config,
        train_dataset=Dataset.from_list(chat_pairs(pairs)),
        processing_class=tokenizer,
    )
    fit(trainer, out)
    return out


class SaveAtFractions(TrainerCallback):
    """Saves model and tokenizer when training reaches given fractions of its steps.

    Trainer can only save every N steps; the paper's checkpoints (10, 20, 40 and
    100% of DPO's steps) need saves at chosen steps.
    """

    def __init__(self, targets: Dict[float, Path], tokenizer: PreTrainedTokenizerFast):
        self.targets = targets
        self.tokenizer = tokenizer
        self.steps: Dict[int, List[Path]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for fraction, path in self.targets.items():
            step = min(state.max_steps, max(1, round(fraction * state.max_steps)))
            self.steps.setdefault(step, []).append(path)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for path in self.steps.get(state.global_step, []):
            model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))


def train_dpo(
    checkpoints: Dict[float, Path],
    sft_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    pairs: Sequence[Dict[str, str]],
    *,
    seed: int,
    beta: float,
    learning_rate: float,
    batch_size: int,
    warmup: float,
    max_length: int,
    work: Path,
) -> Dict[float, Path]:
    """DPOTrainer (sigmoid loss) from the SFT model, one epoch, saved at each fraction."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **cpu_arguments(
            work, seed, learning_rate=learning_rate, per_device_train_batch_size=batch_size, warmup_steps=warmup
        ),
        beta=beta,
        loss_type=["sigmoid"],
        max_length=max_length,
    )
    model = LlamaForCausalLM.from_pretrained(str(sft_path))
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(chat_pairs(pairs)),
        processing_class=tokenizer,
        callbacks=[SaveAtFractions(checkpoints, tokenizer)],
    )
    fit(trainer)
    missing = [str(p) for p in checkpoints.values() if not (p / "config.json").exists()]
    if missing:
        raise RuntimeError(f"DPO ended without saving {missing}")
    return checkpoints

