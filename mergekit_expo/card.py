"""Model card for `expo` merges: mergekit's card plus an ExPO section.

Built offline: a model counts as a Hub ID only when it is not a local path and
looks like `owner/name`; the Hub is never asked.
"""

import os
import re
from typing import List, Optional

import yaml
from mergekit.card import CARD_TEMPLATE
from mergekit.config import MergeConfiguration
from mergekit.common import ModelReference

from mergekit_expo import stats
from mergekit_expo.method import PAPER_URL

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

BIBTEX = """@inproceedings{zheng2025model,
  title     = {Model Extrapolation Expedites Alignment},
  author    = {Zheng, Chujie and Wang, Ziqi and Ji, Heng and Huang, Minlie and Peng, Nanyun},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2025},
  eprint    = {2404.16792},
  archivePrefix = {arXiv}
}"""

EXPO_SECTION = """
## ExPO (model extrapolation)

This model was made with [ExPO]({url}) through the `expo` merge method of
[mergekit-expo](https://pypi.org/project/mergekit-expo/):
theta2 = theta1 + alpha * (theta1 - theta0), where theta0 is the SFT model and
theta1 the aligned model{plural}.

- SFT model (theta0): {theta0}
- Aligned model{plural} (theta1): {theta1}
- alpha: {alpha}
- Output dtype: {out_dtype} (computed in float32, rounded once)
{delta_line}
{alpha_table}
### Citation

```bibtex
{bibtex}
```
"""


def is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def model_md(model: ModelReference) -> str:
    path = model.model.path
    if is_hub_id(path):
        return f"[{path}](https://huggingface.co/{path})"
    return f"`{path}`"


def expo_card(
    config: MergeConfiguration, config_yaml: str, name: Optional[str] = None
) -> str:
    theta0 = config.base_model
    aligned = [m for m in _ordered_models(config) if m != theta0]
    hub_ids = [m.model.path for m in [theta0, *aligned] if is_hub_id(m.model.path)]
    summary = stats.summarize(stats.records())
    section = EXPO_SECTION.format(
        url=PAPER_URL,
        plural="s" if len(aligned) > 1 else "",
        theta0=model_md(theta0),
        theta1=", ".join(model_md(m) for m in aligned),
        alpha=_alpha_text(summary),
        out_dtype=config.out_dtype or config.dtype or "as stored",
        delta_line=_delta_line(summary),
        alpha_table=_alpha_table(summary),
        bibtex=BIBTEX,
    )
    body = CARD_TEMPLATE.format(
        metadata=yaml.dump(
            {
                "base_model": hub_ids,
                "tags": ["mergekit", "merge", "expo", "model-extrapolation"],
                "library_name": "transformers",
            }
        ),
        name=name or "Untitled Model (1)",
        merge_method=f"[ExPO]({PAPER_URL})",
        base_text=f" using {model_md(theta0)} as the SFT model (theta0)",
        model_list="\n".join(f"* {model_md(m)}" for m in aligned),
        config_yaml=config_yaml,
    )
    return body + section


def _ordered_models(config: MergeConfiguration) -> List[ModelReference]:
    if config.models:
        return [m.model for m in config.models]
    return sorted(config.referenced_models(), key=lambda m: m.model.path)


def _alpha_text(summary: Optional[stats.Summary]) -> str:
    if summary is None:
        return "n/a"
    low, high = summary.alpha_range
    return f"{low:g}" if low == high else f"{low:g} to {high:g} (varies by module, see below)"


def _delta_line(summary: Optional[stats.Summary]) -> str:
    if summary is None:
        return ""
    return (
        f"- Weight change theta1 - theta0: normalized Frobenius norm "
        f"{summary.normalized_frobenius:.3e}, "
        f"{100 * summary.changed / max(summary.numel, 1):.2f}% of elements changed\n"
    )


def _alpha_table(summary: Optional[stats.Summary]) -> str:
    if summary is None:
        return ""
    low, high = summary.alpha_range
    if low == high:
        return ""
    rows = "\n".join(
        f"| {kind} | {a:g} | {b:g} |" for kind, (a, b) in summary.alphas.items()
    )
    return f"\n| module | min alpha | max alpha |\n|---|---|---|\n{rows}\n"
