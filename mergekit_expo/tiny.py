"""Tiny llama-style model families built locally, for tests, benchmarks and the demo.

No hub access: the tokenizer is a `tokenizers` word-level model with a chat
template, the weights are random. An "aligned" model is the SFT model plus a
small seeded change, stored in the same dtype, like a DPO checkpoint.
"""

import os
from typing import Dict, Optional, Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = (
    "the a an and or of to in on with is are was be this that it you i we they "
    "what how why when where which who please tell me about describe explain "
    "good bad nice small large red blue green cat dog bird tree house river "
    "model answer question yes no thanks hello world . , ? !"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% else %}<|assistant|> {{ message['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(words: Sequence[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with a dedicated pad token and a chat template that emits EOS."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 4,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def perturbed(
    state: Dict[str, torch.Tensor], scale: float, seed: int
) -> Dict[str, torch.Tensor]:
    """theta0 plus seeded Gaussian noise of relative size `scale`, in theta0's dtype."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, tensor in state.items():
        base = tensor.float()
        noise = torch.randn(base.shape, generator=generator) * base.std().clamp_min(1e-3)
        result[name] = (base + scale * noise).to(tensor.dtype)
    return result


def save_model(
    path: str,
    config: LlamaConfig,
    state: Dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerFast,
) -> str:
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.to(next(iter(state.values())).dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_family(
    out_dir: str,
    *,
    aligned: Sequence[str] = ("dpo", "dpo_b"),
    dtype: torch.dtype = torch.bfloat16,
    scale: float = 0.02,
    seed: int = 0,
    config: Optional[LlamaConfig] = None,
) -> Dict[str, str]:
    """Write `sft/` and one folder per aligned name under out_dir; return their paths."""
    tokenizer = build_tokenizer()
    config = config or tiny_config(len(tokenizer))
    torch.manual_seed(seed)
    sft_state = {k: v.to(dtype) for k, v in LlamaForCausalLM(config).state_dict().items()}
    paths = {"sft": save_model(os.path.join(out_dir, "sft"), config, sft_state, tokenizer)}
    for index, name in enumerate(aligned):
        state = perturbed(sft_state, scale, seed=seed + 1 + index)
        paths[name] = save_model(os.path.join(out_dir, name), config, state, tokenizer)
    return paths


def build_reward_model(path: str, seed: int = 0, num_labels: int = 1) -> str:
    """A tiny scalar reward model: an ordinary HF sequence classifier, loaded like RM-Mistral-7B."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer))
    config.num_labels = num_labels
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
