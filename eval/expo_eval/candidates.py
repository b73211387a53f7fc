"""Candidate weights for every alpha from mergekit's own plan, without writing checkpoints.

The recipe is planned by mergekit exactly as `mergekit-yaml` plans it; the input
tensors are mapped once (mergekit's loader memory-maps safetensors files, so they
cost page cache, not anonymous memory), and each alpha re-runs only the planned
`expo` tasks on them. The weights are therefore bitwise what `mergekit-yaml` would
write. Large tensors are computed in row chunks, so a candidate's transients stay
at a few chunk-sized buffers instead of float32 copies of whole tensors.
"""

import ctypes
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_expo.compat import (
    Executor,
    ExecuteMergeMethodTask,
    GatherTensors,
    ImmutableMap,
    LoaderCache,
    MergePlanner,
    ModelReference,
    SaveTensor,
    dtype_from_name,
    forget_loaders,
    get_architecture_info,
    with_output_dtype,
)

from mergekit_expo.errors import ExpoError
from mergekit_expo.method import NonFiniteError
from mergekit_expo.rules import require_base_model
from mergekit_expo.run import MergeError, output_dtype

# Elements per chunk: 4 MiB per float32 buffer (the kernel holds a few), big enough
# that per-call overhead is small next to the arithmetic.
CHUNK_ELEMENTS = 1 << 20

Rows = Union[slice, type(Ellipsis)]


class RecipeError(ExpoError, ValueError):
    """The recipe cannot be swept."""


def load_recipe(text: str) -> MergeConfiguration:
    import yaml
    from pydantic import ValidationError

    try:
        recipe = MergeConfiguration.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as error:
        raise RecipeError(f"not a valid mergekit recipe: {error}") from None
    if recipe.merge_method != "expo":
        raise RecipeError(
            f"a sweep needs an `expo` recipe; this one uses merge_method: {recipe.merge_method}"
        )
    check_sweepable(recipe)
    try:
        require_base_model(recipe)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return recipe


def check_sweepable(recipe: MergeConfiguration) -> None:
    """Refuse what the merge takes but the sweep cannot build: each candidate is filled into
    a model of the aligned model's shape (or handed to vLLM as its checkpoint), so the recipe
    must produce that model's tensors, from checkpoints whose contents key the cache."""
    if recipe.slices:
        raise RecipeError(
            "a `slices:` recipe cannot be swept: the sweep builds each candidate in place in the "
            "aligned model, from `base_model:` and `models:`; sweep the same models written that "
            "way, then set the chosen alpha in your slices recipe"
        )
    for model in recipe.referenced_models():
        if model.lora is not None:
            raise RecipeError(
                f"{model}: the sweep does not take LoRA adapters (`model+lora`); merge the adapter "
                "into its model first (mergekit-yaml --lora-merge-cache DIR, on a recipe with "
                f"`merge_method: passthrough` and `models: [{{model: {model}}}]`) and name the "
                "merged folder in the recipe"
            )


def merge_options(trust_remote_code: bool = False) -> MergeOptions:
    """The options the sweep plans, loads and checks a recipe with: mergekit-yaml's, quiet;
    trust_remote_code (--trust-remote-code) lets models that ship their own code load."""
    return MergeOptions(quiet=True, trust_remote_code=trust_remote_code)


class Candidates:
    """theta0 and the aligned model(s), mapped once; weights for any alpha on demand."""

    def __init__(self, recipe: MergeConfiguration, options: Optional[MergeOptions] = None):
        options = options or merge_options()
        recipe = recipe.model_copy(update={"out_dtype": output_dtype(recipe, options)})
        self.recipe = recipe
        self.options = options  # what loads the models' configs and code (trust_remote_code)
        self.dtype = dtype_from_name(recipe.out_dtype) or torch.float32
        LoaderCache().setup(options=options)
        forget_loaders(recipe.referenced_models())  # read the files as they are now
        arch_info = get_architecture_info(recipe, options)
        out_config = recipe.base_model.config(trust_remote_code=options.trust_remote_code)
        planner = MergePlanner(recipe.model_copy(deep=True), arch_info, options, out_config)
        # plan_in_memory fails in mergekit 0.1.5 (ReturnTensor validates an abstract
        # Task); the to-disk plan holds the same tasks, and its writer never runs.
        planned = with_output_dtype(planner.plan_to_disk(out_path=""))
        targets = [t for t in planned if isinstance(t, SaveTensor)]
        # Load as stored, and cast each chunk inside the method call instead (the task's
        # `dtype`: mergekit aligns the inputs to it), so the sweep does not hold converted
        # copies of both models; the values the kernel sees are the same.
        self._tasks = []
        loads = {}
        for target in targets:
            task, gather = target.tensor_task, target.tensor_task.gather_tensors
            if _castable_later(task, gather):
                task = task.model_copy(update={"dtype": gather.dtype})
                gather = gather.model_copy(update={"dtype": None})
            loads[target] = (task, gather)
        loaded = dict(Executor(list({g for _, g in loads.values()}), math_device="cpu", storage_device="cpu").run(quiet=True))
        # (name, task, inputs, the dtype mergekit's writer stores this tensor in)
        self._tasks: List[Tuple[str, ExecuteMergeMethodTask, Dict[ModelReference, torch.Tensor], torch.dtype]] = [
            (target.tensor_name, task, loaded[gather], dtype_from_name(target.dtype) or self.dtype)
            for target, (task, gather) in loads.items()
        ]

    @property
    def aligned_models(self) -> List[ModelReference]:
        return [model.model for model in self.recipe.models or []]

    @property
    def names(self) -> List[str]:
        return [name for name, _, _, _ in self._tasks]

    def chunks(self, alpha: Optional[float]) -> Iterator[Tuple[str, torch.Size, Rows, torch.Tensor]]:
        """(name, full shape, rows, values) pieces of the candidate, in the output dtype.

        alpha None gives theta0 itself. Elementwise recipes come in row chunks of at
        most CHUNK_ELEMENTS; sparsified or stochastically rounded tensors (their
        draws and top-k span the whole tensor) come whole. The kernel's per-tensor
        checks (NaN or Inf inputs, a result the output dtype cannot hold) raise the
        merge's MergeError, with the alpha.
        """
        for name, task, tensors, dtype in self._tasks:
            base = tensors[task.base_model]
            if alpha is None:
                for rows in _row_chunks(base, chunked=True):
                    yield name, base.shape, rows, base[rows].to(dtype)
                continue
            task = task.model_copy(
                update={"parameters": ImmutableMap(dict(task.parameters.items(), alpha=alpha))}
            )
            for rows in _row_chunks(base, chunked=_elementwise(task)):
                try:
                    piece = task.execute(tensors={model: t[rows] for model, t in tensors.items()})
                except NonFiniteError as error:  # it names the tensor and the model
                    raise MergeError(f"alpha={alpha:g}: {error}") from None
                yield name, base.shape, rows, piece.to(dtype)

    def check(self, alphas: Sequence[float]) -> None:
        """Build the candidate at each alpha and discard it: the merge's per-tensor checks,
        without a model to fill (chunk-sized transients only)."""
        for alpha in alphas:
            for _ in self.chunks(alpha):
                pass

    def fill(self, alpha: Optional[float], destination: Mapping[str, torch.Tensor]) -> int:
        """Write the candidate into existing tensors (a model's parameters); returns the count.

        Each chunk is copied straight into its destination, so nothing of tensor size
        is allocated. Raises KeyError naming a tensor the destination lacks.
        """
        written = set()
        for name, shape, rows, piece in self.chunks(alpha):
            if name not in destination:
                raise KeyError(name)
            target = destination[name]
            if target.shape != shape:
                raise ValueError(
                    f"tensor {name}: the recipe gives shape {tuple(shape)}, the model has {tuple(target.shape)}"
                )
            target[rows].copy_(piece)
            written.add(name)
        return len(written)

    def weights(self, alpha: Optional[float]) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) in the output dtype, one fresh tensor at a time (for loaders
        that take whole checkpoint tensors, such as vLLM's)."""
        current, buffer = None, None
        for name, shape, rows, piece in self.chunks(alpha):
            if rows is Ellipsis:  # whole already
                if current is not None:
                    yield current, buffer
                current, buffer = None, None
                yield name, piece
                continue
            if name != current:
                if current is not None:
                    yield current, buffer
                current, buffer = name, torch.empty(shape, dtype=piece.dtype)
            buffer[rows].copy_(piece)
        if current is not None:
            yield current, buffer


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A candidate's tensor-sized buffers are freed after each swap, but glibc keeps them
    in its per-thread arenas: measured in vLLM workers at tensor-parallel size 2, that
    left 0.35-0.55 GiB per worker counted as the process's own memory until trimmed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _castable_later(task, gather) -> bool:
    """Whether the recipe's input cast can move from loading into the method call: a
    plain load with one dtype for every input, and a task that casts nothing itself."""
    return (
        isinstance(gather, GatherTensors)
        and gather.dtype is not None
        and task.dtype is None
        and all(info.force_dtype is None for info in gather.weight_info.values())
    )


def _elementwise(task: ExecuteMergeMethodTask) -> bool:
    """Whether each output element depends only on the same input elements."""
    if "rounding" in task.parameters and task.parameters["rounding"] == "stochastic":
        return False
    return all(
        "density" not in parameters or parameters["density"] is None or parameters["density"] >= 1
        for parameters in (task.input_parameters[model] for model in task.input_parameters)
    )


def _row_chunks(tensor: torch.Tensor, chunked: bool) -> Iterator[Rows]:
    """Row ranges covering tensor, each at most CHUNK_ELEMENTS (Ellipsis: all at once)."""
    if not chunked or tensor.dim() == 0 or tensor.numel() <= CHUNK_ELEMENTS or not tensor.is_floating_point():
        yield Ellipsis
        return
    per_row = max(1, tensor[0].numel())
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, tensor.shape[0], step):
        yield slice(start, min(start + step, tensor.shape[0]))
