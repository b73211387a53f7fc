"""Fixtures: tiny local model families and helpers to run recipes (never a hub)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def file_digest_cache(tmp_path_factory):
    """The fingerprints' file digests are cached in the session's tmp folder, not the user's cache
    (set in os.environ, so the CLI's subprocesses use it too)."""
    os.environ["MERGEKIT_EXPO_CACHE"] = str(tmp_path_factory.mktemp("file-digests"))


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """tiny/sft, tiny/dpo, tiny/dpo_b in bf16, as `mergekit-expo tiny-models` builds them."""
    from mergekit_expo.tiny import build_family

    root = tmp_path_factory.mktemp("family")
    return {k: Path(v) for k, v in build_family(str(root / "tiny")).items()}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny scalar reward model (random weights), saved locally."""
    from mergekit_expo.tiny import build_reward_model

    return build_reward_model(str(tmp_path_factory.mktemp("rm") / "rm"))


@pytest.fixture
def recipe(family, tmp_path):
    """An alpha-0.3 `expo` recipe file over the family's sft and dpo."""
    return write_recipe(tmp_path / "recipe.yaml", expo_recipe(family))


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def expo_recipe(family, alpha=0.3, models=("dpo",), **extra) -> dict:
    return {
        "merge_method": "expo",
        "base_model": str(family["sft"]),
        "models": [{"model": str(family[name])} for name in models],
        "parameters": {"alpha": alpha},
        "dtype": "bfloat16",
        **extra,
    }


def slices_recipe(family) -> dict:
    """An alpha-0.3 `expo` recipe written with `slices:` (layers 0-1 of sft and dpo)."""
    return {
        "merge_method": "expo",
        "slices": [{"sources": [{"model": str(family["sft"]), "layer_range": [0, 2]},
                                {"model": str(family["dpo"]), "layer_range": [0, 2]}],
                    "base_model": str(family["sft"])}],
        "parameters": {"alpha": 0.3},
        "dtype": "bfloat16",
    }


def run_cli(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """Run one of the venv's console scripts in a fresh process."""
    result = subprocess.run(
        [str(BIN / args[0]), *map(str, args[1:])],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def merge(recipe: dict, tmp_path: Path, name="out") -> Path:
    """Run a recipe in-process through mergekit's own `run_merge`."""
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    out = tmp_path / name
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(recipe),
        str(out),
        options=MergeOptions(quiet=True),
        config_source=yaml.safe_dump(recipe, sort_keys=False),
    )
    return out


def load(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) correctly rounded to `dtype` (ties to even, subnormals too), as float64."""
    info = torch.finfo(dtype)
    bits = 1 - int(math.log2(info.eps))
    min_exponent = int(torch.frexp(torch.tensor(info.tiny))[1])
    mantissa, exponent = torch.frexp(x)
    bits = bits - (min_exponent - exponent).clamp_min(0)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, bits)), exponent - bits)


def ulp_error(out: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the bf16 ulp at ref."""
    _, exponent = torch.frexp(ref64)
    return (out.double() - ref64).abs() / torch.ldexp(torch.ones_like(ref64), exponent - 8)


def misrounded_share(out: torch.Tensor, exact64: torch.Tensor) -> float:
    """Share of elements farther from the exact value than its nearest `out.dtype` value.

    At exact ties both neighbours are equally near and either counts as correct;
    the float64 `exact` is trusted to 2**-40 of an ulp.
    """
    best = nearest(exact64, out.dtype)
    slack = exact64.abs() * 2.0**-40
    worse = (out.double() - exact64).abs() > (best - exact64).abs() + slack
    return worse.double().mean().item()
