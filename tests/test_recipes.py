"""Recipes: all parse as mergekit configs, paper recipes match the paper, tiny ones run.

Paper: ExPO, arXiv 2404.16792 (model IDs from Appendix C, alphas from Tables 6 and 7).
"""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mergekit.config import ConditionalParameter
from mergekit.scripts import multimerge, run_yaml

import mergekit_expo  # noqa: F401  (registers `expo` for in-process runs)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(p for p in RECIPES.rglob("*") if p.suffix in (".yaml", ".yml"))
MULTI_DOC = [p for p in ALL if len(list(yaml.safe_load_all(p.read_text()))) > 1]

MISTRAL_SFT = "alignment-handbook/zephyr-7b-sft-full"
LLAMA_SFT = "princeton-nlp/Llama-3-Base-8B-SFT"
NA = None  # Table 6 "no gain (N/A)": the recipe must say so and use alpha 0 (= theta1)

# name -> (theta0, theta1, alpha); Table 2/7 (zephyr-7b-dpo) and Table 5/7 (existing models).
PAPER = {
    "zephyr-7b-dpo": (MISTRAL_SFT, "alignment-handbook/zephyr-7b-dpo-full", 0.3),
    "zephyr-7b-alpha": ("HuggingFaceH4/mistral-7b-sft-alpha", "HuggingFaceH4/zephyr-7b-alpha", 0.3),
    "zephyr-7b-beta": ("HuggingFaceH4/mistral-7b-sft-beta", "HuggingFaceH4/zephyr-7b-beta", 0.1),
    "tulu2-7b": ("allenai/tulu-2-7b", "allenai/tulu-2-dpo-7b", 0.5),
    "tulu2-13b": ("allenai/tulu-2-13b", "allenai/tulu-2-dpo-13b", 0.5),
    "tulu2-70b": ("allenai/tulu-2-70b", "allenai/tulu-2-dpo-70b", 0.5),
    "snorkel-7b-iter": ("mistralai/Mistral-7B-Instruct-v0.2", "snorkelai/Snorkel-Mistral-PairRM-DPO", 0.3),
    "llama3-8b-iter": ("RLHFlow/LLaMA3-SFT", "RLHFlow/LLaMA3-iterative-DPO-final", 0.3),
    "starling-7b-alpha": ("openchat/openchat_3.5", "berkeley-nest/Starling-LM-7B-alpha", 0.2),
    "starling-7b-beta": ("openchat/openchat-3.5-0106", "Nexusflow/Starling-LM-7B-beta", 0.5),
    "internlm2-1.8b": ("internlm/internlm2-chat-1_8b-sft", "internlm/internlm2-chat-1_8b", 0.5),
    "internlm2-7b": ("internlm/internlm2-chat-7b-sft", "internlm/internlm2-chat-7b", 0.5),
    "internlm2-20b": ("internlm/internlm2-chat-20b-sft", "internlm/internlm2-chat-20b", 0.5),
}
# Table 6: file suffix -> (princeton-nlp Hub suffix, Mistral-based alpha, LLaMA-3-based alpha).
TABLE6 = {
    "rrhf": ("RRHF", 0.1, 0.5),
    "slic-hf": ("SLiC-HF", 0.4, 0.5),
    "ipo": ("IPO", 0.5, 0.3),
    "cpo": ("CPO", 0.3, 0.5),
    "kto": ("KTO", NA, 0.4),
    "rdpo": ("RDPO", 0.3, 0.5),
    "simpo": ("SimPO", 0.1, 0.4),
}
for _suffix, (_hub, _mistral, _llama) in TABLE6.items():
    PAPER[f"mistral-7b-base-{_suffix}"] = (MISTRAL_SFT, f"princeton-nlp/Mistral-7B-Base-SFT-{_hub}", _mistral)
    PAPER[f"llama3-8b-base-{_suffix}"] = (LLAMA_SFT, f"princeton-nlp/Llama-3-Base-8B-SFT-{_hub}", _llama)


def paper_path(name: str) -> Path:
    return RECIPES / "zephyr_expo.yaml" if name == "zephyr-7b-dpo" else RECIPES / "paper" / f"{name}.yaml"


def configs(path: Path):
    """{stage name (None for the final/only one): MergeConfiguration}, loaded as mergekit-multi does."""
    merge_configs, _ = multimerge.load_config(path.read_text(), "intermediate")
    return merge_configs


def scalars(setting):
    """Every value a parameter setting can take (filters and gradients flattened)."""
    if isinstance(setting, ConditionalParameter):
        return scalars(setting.value)
    if isinstance(setting, list):
        return [v for item in setting for v in scalars(item)]
    return [setting]


def test_recipe_tree_is_populated():
    assert {p.parent.name for p in ALL} >= {"recipes", "paper", "combos", "tiny"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_and_expo_is_complete(path):
    for name, cfg in configs(path).items():
        assert cfg.referenced_models(), (path, name)
        if cfg.merge_method != "expo":
            continue
        assert cfg.base_model is not None, f"{path} ({name}): expo needs base_model (the SFT model)"
        assert cfg.parameters and "alpha" in cfg.parameters, f"{path} ({name}): expo needs alpha"
        for value in scalars(cfg.parameters["alpha"]):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (path, value)
            assert value > -1, (path, value)


@pytest.mark.parametrize("path", MULTI_DOC, ids=lambda p: str(p.relative_to(RECIPES)))
def test_multi_stage_recipes_use_every_named_stage(path):
    merge_configs, dependencies = multimerge.load_config(path.read_text(), "intermediate")
    used = set().union(*dependencies.values())
    assert None in merge_configs, f"{path}: no unnamed final stage"
    assert set(merge_configs) - {None} <= used, f"{path}: a named stage feeds nothing"


def test_all_paper_models_have_recipes():
    shipped = {p.stem for p in (RECIPES / "paper").glob("*.yaml")}
    assert shipped == set(PAPER) - {"zephyr-7b-dpo"}
    assert len(shipped) == 12 + 14
    assert paper_path("zephyr-7b-dpo").is_file()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_matches_table(name):
    theta0, theta1, alpha = PAPER[name]
    path = paper_path(name)
    (cfg,) = configs(path).values()
    assert cfg.merge_method == "expo"
    assert cfg.base_model.model.path == theta0
    assert [m.model.model.path for m in cfg.models] == [theta1]
    assert cfg.dtype == "bfloat16"
    text = path.read_text()
    if alpha is NA:
        assert cfg.parameters["alpha"] == 0 and "no gain" in text.lower()
    else:
        assert cfg.parameters["alpha"] == pytest.approx(alpha)
    assert ("--trust-remote-code" in text) == name.startswith("internlm2")


TINY = sorted((RECIPES / "tiny").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mergekit_expo.tiny import build_family

    root = tmp_path_factory.mktemp("tiny_recipes")
    build_family(str(root / "tiny"))
    return root


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.name)
def test_tiny_recipe_runs(path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tiny_dir / "out" / path.stem
    if path in MULTI_DOC:
        command, args = multimerge.main, [str(path), "-I", str(tiny_dir / "stages" / path.stem), "--out-path", str(out)]
    else:
        command, args = run_yaml.main, [str(path), str(out)]
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
