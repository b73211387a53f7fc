"""The tokenizer and chat template `mergekit-yaml` writes into the merged folder for a recipe.

mergekit 0.1.5 (merge.py `run_merge`, plan.py, tokenizer/build.py): a `tokenizer_source` or
a `tokenizer:` section makes it build a tokenizer (the base model's, another model's, or the
union of the inputs' vocabularies, plus any added tokens) and resize the embeddings to its
vocabulary; without one it copies the donor's tokenizer files (the base model, else the
first input model). Either way the recipe's `chat_template:` then replaces the template. A
sweep that chooses alpha for this merge renders its prompts with what this module returns.
"""

from typing import List, Optional

from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from transformers import AutoTokenizer

from mergekit_expo import compat


def merged_tokenizer(merge_config, options: Optional[MergeOptions] = None):
    """The tokenizer (chat template included) that merging `merge_config` writes.

    Raises ValueError for a `chat_template:` value mergekit refuses.
    """
    options = options or MergeOptions()
    tokenizer = compat.built_tokenizer(merge_config, options)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(
            compat.donor_folder(merge_config, options), trust_remote_code=options.trust_remote_code
        )
    compat.set_chat_template(tokenizer, merge_config)
    return tokenizer


def merged_vocab_size(merge_config, tokenizer) -> Optional[int]:
    """The embedding rows the merge writes for `tokenizer` (from `merged_tokenizer`): its
    vocabulary, padded to the `tokenizer:` section's pad_to_multiple_of (mergekit's
    `_update_config_vocab`); None where the merge keeps the models' own embeddings."""
    section = merge_config.tokenizer
    if section is None and merge_config.tokenizer_source is None:
        return None
    size = len(tokenizer.get_vocab())
    multiple = section.pad_to_multiple_of if section is not None else None
    return -(-size // multiple) * multiple if multiple else size


def tokenizer_models(merge_config) -> List[str]:
    """The models, besides the recipe's base and input models, whose files the merge's
    tokenizer is built from: a `tokenizer_source` (or `tokenizer:` source) that names a
    model, and the models that `tokenizer: tokens:` take embeddings from."""
    section = merge_config.tokenizer
    sources = [section.source if section is not None else merge_config.tokenizer_source]
    for token in ((section.tokens or {}).values() if section is not None else ()):
        sources.append(getattr(token.source, "model", token.source))  # a model_token's model
    return list(dict.fromkeys(s.model.path for s in sources if isinstance(s, ModelReference)))
