"""Read safetensors checkpoints and copy them into native modules by parameter name.

A native module may declare:
- ``param_names_mapping``: ``{regex: template}`` or ``{regex: (template, shard_id)}``; a
  checkpoint key that fully matches ``regex`` loads into the parameter named by
  ``match.expand(template)``, through that parameter's ``weight_loader`` (with ``shard_id``
  when given). Keys that match no pattern keep their name.
- ``ignored_checkpoint_keys``: regexes of checkpoint keys that are dropped on purpose.
- ``_keep_in_fp32_modules``: module names whose parameters stay float32 whatever the
  requested dtype (as diffusers does for the same modules).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_INDEX_SUFFIX = ".safetensors.index.json"


class WeightLoadingError(ValueError):
    """A checkpoint does not fit the module built from its config."""


def find_safetensors_files(folder: Path, component: str) -> list[Path]:
    """The checkpoint files of one component folder: sharded (via its index) or single."""
    indexes = sorted(folder.glob(f"*{_INDEX_SUFFIX}"))
    if indexes:
        index = json.loads(indexes[0].read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightLoadingError(
                f"component '{component}': {indexes[0].name} lists shard files that are "
                f"missing from {folder}: {missing}"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found {others}; convert them to safetensors)" if others else ""
        raise WeightLoadingError(
            f"component '{component}': no .safetensors weights in {folder}{hint}"
        )
    return files


def iterate_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, so peak memory stays one tensor."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def _compile_mapping(model: nn.Module) -> list[tuple[re.Pattern[str], str, object]]:
    rules = []
    for pattern, target in getattr(model, "param_names_mapping", {}).items():
        template, shard_id = target if isinstance(target, tuple) else (target, None)
        rules.append((re.compile(pattern), template, shard_id))
    return rules


def _expected_shards(param: torch.Tensor) -> set | None:
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    shard_ids = getattr(owner, "shard_ids", None)
    return set(shard_ids) if shard_ids is not None else None


def _plain_copy(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise WeightLoadingError(
            f"shape mismatch for '{name}': checkpoint {tuple(loaded.shape)}, "
            f"model {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def load_weights_into_model(
    model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], component: str
) -> None:
    """Copy checkpoint tensors into ``model``; every parameter must be filled exactly once.

    Raises ``WeightLoadingError`` naming the component and the keys for missing or unexpected
    keys and for shape mismatches.
    """
    rules = _compile_mapping(model)
    ignored = [re.compile(p) for p in getattr(model, "ignored_checkpoint_keys", ())]
    state = dict(model.named_parameters())
    state.update(
        (name, buf)
        for name, buf in model.named_buffers()
        if name in model.state_dict()  # persistent buffers only
    )
    loaded: dict[str, set] = {}
    unexpected: list[str] = []

    for key, tensor in named_tensors:
        target, shard_id = key, None
        for pattern, template, rule_shard in rules:
            match = pattern.fullmatch(key)
            if match:
                target, shard_id = match.expand(template), rule_shard
                break
        if target not in state:
            if not any(p.fullmatch(key) for p in ignored):
                unexpected.append(key)
            continue
        param = state[target]
        weight_loader = getattr(param, "weight_loader", None)
        try:
            if weight_loader is None:
                _plain_copy(param, tensor, target)
            elif shard_id is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard_id)
        except WeightLoadingError as err:
            raise WeightLoadingError(f"component '{component}': {err}") from None
        except ValueError as err:
            raise WeightLoadingError(
                f"component '{component}': checkpoint key '{key}' does not fit parameter "
                f"'{target}': {err}"
            ) from None
        loaded.setdefault(target, set()).add(shard_id)

    missing = []
    for name, param in state.items():
        shards = loaded.get(name)
        if shards is None:
            missing.append(name)
        elif None not in shards:
            expected = _expected_shards(param)
            if expected is not None and shards != expected:
                missing.extend(f"{name}[{s}]" for s in sorted(map(str, expected - shards)))
    problems = []
    if missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {sorted(missing)}")
    if unexpected:
        problems.append(
            f"unexpected keys (in the checkpoint, not in the model): {sorted(unexpected)}"
        )
    if problems:
        raise WeightLoadingError(f"component '{component}': " + "; ".join(problems))


def keep_modules_in_fp32(model: nn.Module) -> None:
    """Cast the parameters of ``model._keep_in_fp32_modules`` back to float32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
