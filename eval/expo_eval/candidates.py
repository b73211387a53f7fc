"""Candidate weights for every alpha from mergekit's own plan, without writing checkpoints.

The recipe is planned by mergekit exactly as `mergekit-yaml` plans it; the input
tensors are loaded once, and each alpha re-runs only the planned `expo` tasks on
them. The weights are therefore bitwise what `mergekit-yaml` would write.
"""

from typing import Dict, Iterator, List, Optional, Tuple

import torch
from mergekit.architecture import get_architecture_info
from mergekit.common import ImmutableMap, ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from mergekit_expo import stats
from mergekit_expo.registration import output_dtype


class RecipeError(ValueError):
    """The recipe cannot be swept."""


def load_recipe(text: str) -> MergeConfiguration:
    import yaml

    recipe = MergeConfiguration.model_validate(yaml.safe_load(text))
    if recipe.merge_method != "expo":
        raise RecipeError(
            f"a sweep needs an `expo` recipe; this one uses merge_method: {recipe.merge_method}"
        )
    if recipe.base_model is None:
        raise RecipeError("expo needs base_model: the SFT checkpoint (theta0)")
    return recipe


class Candidates:
    """theta0 and the aligned model(s), loaded once; weights for any alpha on demand."""

    def __init__(self, recipe: MergeConfiguration, options: Optional[MergeOptions] = None):
        options = options or MergeOptions(quiet=True)
        recipe = recipe.model_copy(update={"out_dtype": output_dtype(recipe, options)})
        self.recipe = recipe
        self.dtype = dtype_from_name(recipe.out_dtype) or torch.float32
        LoaderCache().setup(options=options)
        arch_info = get_architecture_info(recipe, options)
        out_config = recipe.base_model.config(trust_remote_code=options.trust_remote_code)
        planner = MergePlanner(recipe.model_copy(deep=True), arch_info, options, out_config)
        # plan_in_memory fails in mergekit 0.1.5 (ReturnTensor validates an abstract
        # Task); the to-disk plan holds the same tasks, and its writer never runs.
        targets = [t for t in planner.plan_to_disk(out_path="") if isinstance(t, SaveTensor)]
        gathers = list({target.tensor_task.gather_tensors for target in targets})
        loaded = dict(Executor(gathers, math_device="cpu", storage_device="cpu").run(quiet=True))
        self._tasks: List[Tuple[str, ExecuteMergeMethodTask, Dict[ModelReference, torch.Tensor]]] = [
            (target.tensor_name, target.tensor_task, loaded[target.tensor_task.gather_tensors])
            for target in targets
        ]

    @property
    def aligned_models(self) -> List[ModelReference]:
        return [model.model for model in self.recipe.models or []]

    def weights(self, alpha: Optional[float]) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) in the output dtype; alpha None gives theta0 itself."""
        stats.reset(self.dtype, collect=False)  # round as mergekit-yaml would, stochastic too
        for name, task, tensors in self._tasks:
            if alpha is None:
                value = tensors[task.base_model]
            else:
                parameters = dict(task.parameters.items(), alpha=alpha)
                value = task.model_copy(update={"parameters": ImmutableMap(parameters)}).execute(
                    tensors=tensors
                )
            yield name, value.to(self.dtype)
