"""Family weight maps run both ways: HF tensors -> ours on import, ours -> HF on export.

A map entry is a template (``{n}`` is the layer index) from our tensor name to one HF name, or to
a tuple of HF names concatenated along dim 0 into one fused tensor of ours (q|k|v -> ``attn.qkv``,
k|v -> ``cross_attn.kv``, Llama's gate|up -> ``mlp.fc_in``); a family's ``transposed`` and ``row``
sets mark the tensors stored in another layout. Plain renames stay memory-mapped views of the file;
the rest is read into one tensor allocated in the target dtype, part by part.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from ..checkpoint import unique_state_dict
from ..config import TransformerConfig
from .family import Family, Source
from .files import TensorFiles

log = logging.getLogger(__name__)

HEAD_PARAMS = ("lm_head.weight", "lm_head_bias", "mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight", "mlm_norm.bias")


# --------------------------------------------------------------------------- names
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def layer_template(name: str) -> tuple[str, Optional[int]]:
    """``decoder.layers.3.attn.out.weight`` -> (``decoder.layers.{n}.attn.out.weight``, 3); an expert's
    index becomes ``{e}`` too (``decoder.layers.{n}.mlp.experts.{e}.fc_in.weight``)."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    rest = _EXPERT.sub(".experts.{e}.", name[m.end():], count=1)
    return name[:m.start()] + ".layers.{n}." + rest, int(m.group(1))


def weight_map(family: Family, config: Optional[TransformerConfig] = None) -> dict[str, Source]:
    """The family's weight-name map, with the entries that depend on ``config`` (``Family.weights_for``)."""
    if config is None or family.weights_for is None:
        return family.weights
    return {**family.weights, **family.weights_for(config)}


def _sources(family: Family, name: str, config: Optional[TransformerConfig] = None) -> tuple[tuple[str, ...], str]:
    """HF tensor names behind one of our tensors, and the template that matched."""
    template, n = layer_template(name)
    weights = weight_map(family, config)
    if template not in weights:
        raise ValueError(f"zenlm tensor {name!r} has no {family.model_type} counterpart")
    source = weights[template]
    names = (source,) if isinstance(source, str) else source
    expert = _EXPERT.search(name)
    return tuple(s.format(n=n, e=expert and int(expert.group(1))) for s in names), template


def hf_names(family: Family, ours: list[str], head: bool = True, config: Optional[TransformerConfig] = None
             ) -> list[str]:
    """The HF tensor names of our tensors ``ours`` (without the head model's prefix unless ``head``)."""
    names = [hf for name in ours for hf in _sources(family, name, config)[0]]
    return names if head else [_strip(family, n) for n in names]


def _strip(family: Family, name: str) -> str:
    return name[len(family.prefix):] if name.startswith(family.prefix) else name


def state_names(config: TransformerConfig, cls=None) -> list[str]:
    """Our tensor names for ``config``, from a model built on the meta device (no memory)."""
    from ..model import TransformerLM

    with torch.device("meta"):
        model = (cls or TransformerLM)(config)
    return list(model.state_dict())  # no tied parameters in zenlm models: names are unique


def _part_sizes(parts: int, rows: int, config: TransformerConfig) -> list[int]:
    """Rows of each piece of a fused tensor: q|k|v follows the head counts, k|v and gate|up are halves."""
    if parts == 3:
        kv = config.num_key_value_heads * config.head_dim
        return [rows - 2 * kv, kv, kv]
    return [rows // parts] * parts


# --------------------------------------------------------------------------- import
_LEGACY_NORM = re.compile(r"(?<=LayerNorm\.)(weight|bias)$")


def resolve(files: TensorFiles, family: Family, name: str) -> Optional[str]:
    """The stored name of an HF tensor: as written, without the head model's prefix (a bare
    backbone checkpoint such as MiniLM's BertModel), or a tied copy of it."""
    for candidate in (name, *family.aliases.get(name, ())):
        for stored in (candidate, _strip(family, candidate)):
            if stored in files.where:
                return stored
            legacy = _LEGACY_NORM.sub(lambda m: {"weight": "gamma", "bias": "beta"}[m.group(1)], stored)
            if legacy in files.where:  # early BERT checkpoints (TF ports) name LayerNorm gamma/beta
                return legacy
    return None


def state_from_hf(files: TensorFiles, family: Family, config: TransformerConfig, expected: dict[str, torch.Size],
                  dtype: Optional[torch.dtype] = None, workers: int = 1) -> dict[str, torch.Tensor]:
    """Our tensors (name -> tensor with the ``expected`` shape) read through the family's map, in
    ``dtype`` (None: the dtype most of the file's weights are stored in, ``TensorFiles.main_dtype``).

    A plain rename already in that dtype stays a memory-mapped view of the file (no copy, as in
    transformers). Every other tensor (fused q|k|v or gate|up, transposed, converted) is allocated
    once in the target dtype and its parts are read into it one at a time (``TensorFiles.copy_into``:
    ``pread``, no temporary full copy, the file's pages not kept resident), by ``workers`` threads."""
    pending, used = {}, set()
    for ours, shape in expected.items():
        sources, template = _sources(family, ours, config)
        sizes = _part_sizes(len(sources), shape[0], config) if len(sources) > 1 else [shape[0]]
        parts = []
        for source, rows in zip(sources, sizes):
            stored = resolve(files, family, source)
            if stored is None:
                raise ValueError(f"{files.source}: missing tensor {source!r} (needed for {ours})")
            want = (rows, *shape[1:])
            if template in family.transposed:
                want = want[::-1]
            if template in family.row:
                want = (1, *want)
            if files.shape(stored) != want:
                raise ValueError(f"{files.where[stored]}: tensor {stored!r} has shape {files.shape(stored)}, "
                                 f"expected {want} for this config.json")
            parts.append((stored, rows))
            used.add(stored)
        pending[ours] = (tuple(shape), parts, template in family.transposed, template in family.row)
    # head tensors a bare backbone does not take, and tied copies of tensors already read, are expected leftovers
    known = {resolve(files, family, s) for name in HEAD_PARAMS if name in family.weights
             for s in _sources(family, name)[0]}
    known |= {resolve(files, family, a) for alts in family.aliases.values() for a in alts}
    left = [n for n in files.where if n not in used and n not in known
            and not any(re.fullmatch(p, n) for p in family.ignore)]
    if left:
        log.warning("%s: %d tensor(s) have no place in zenlm's %s model and were not loaded: %s",
                    files.directory, len(left), family.model_type, ", ".join(sorted(left)[:8]))
    target = dtype or files.main_dtype(used)
    state, copies = {}, {}
    for ours, (shape, parts, transposed, row) in pending.items():
        if len(parts) == 1 and not transposed and files.dtype(parts[0][0]) == target:
            tensor = files.get(parts[0][0])  # a view of the mapped file
            state[ours] = (tensor[0] if row else tensor).contiguous()
        else:
            copies[ours] = (shape, parts, transposed)

    def build(item) -> torch.Tensor:
        shape, parts, transposed = item
        out = torch.empty(shape, dtype=target)
        offset = 0
        for stored, rows in parts:
            files.copy_into(stored, out[offset:offset + rows], transposed)
            offset += rows
        return out

    with ThreadPoolExecutor(max(1, workers)) as pool:  # reads and copies release the GIL
        state.update(zip(copies, pool.map(build, copies.values())))
    return {name: state[name] for name in pending}


# --------------------------------------------------------------------------- export
def state_to_hf(model: torch.nn.Module, family: Family, head: bool = True) -> dict[str, torch.Tensor]:
    """HF tensor name -> tensor for this model, the map run backwards."""
    out = {}
    for ours, tensor in unique_state_dict(model).items():
        sources, template = _sources(family, ours, model.config)
        parts = (tensor.split(_part_sizes(len(sources), tensor.size(0), model.config), dim=0)
                 if len(sources) > 1 else (tensor,))
        for name, part in zip(sources, parts):
            if template in family.transposed:
                part = part.t()
            if template in family.row:
                part = part[None]
            out[name if head else _strip(family, name)] = part.contiguous()
    return out
