"""Chat rendering and decoding shared by the generation backends and the reward models."""

from typing import List, Optional, Sequence

Messages = List[dict]  # chat messages: [{"role": "user", "content": ...}]


def render_ids(
    tokenizer,
    messages: Messages,
    *,
    add_generation_prompt: bool,
    chat_template: Optional[str] = None,
) -> List[int]:
    """Token ids of a conversation in the tokenizer's chat template, with exactly one BOS.

    Many chat templates write the BOS token themselves; tokenizing that text with
    special tokens would start it with two (which measurably shifts reward models'
    scores). Templates that do not (zephyr's) still get the tokenizer's own BOS.
    """
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
    )
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def response_text(tokenizer, token_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """A response as text, decoded by the tokenizer from its generated ids.

    Both backends decode this way, so equal token ids give equal text (vLLM's
    incremental detokenizer joins word-level tokens with a leading space).
    """
    ids = list(token_ids)
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)
