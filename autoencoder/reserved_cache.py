"""A key/value cache with room reserved for the text a decoder-only LM writes after its prompt.

`DynamicCache` appends each decoding step's keys and values by concatenation, which copies the whole
cache at every step; a `ReservedLayer` writes them in place into buffers reserved once. Rows that have
finished leave the batch in the order that moves fewest of them (`retirement_order`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["ReservedLayer", "reserve_cache_room", "retirement_order", "stack_cache_rows"]


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of buffers with ``room`` more
    positions: a new position is written in place, where ``DynamicLayer.update`` copies the whole
    cache into a new tensor (``torch.cat``) at every step. Built from the filled ``DynamicLayer`` of
    each group of rows (one group, or several that were prefilled apart), stacked in order."""

    def __init__(self, layers: list[DynamicLayer], room: int):
        super().__init__()
        self.room, self.device, self.is_initialized = room, layers[0].keys.device, True
        self.key_buffer = _with_room([layer.keys for layer in layers], room)
        self.value_buffer = _with_room([layer.values for layer in layers], room)
        self._view(layers[0].keys.shape[-2])

    def _view(self, length: int) -> None:
        self.keys, self.values = self.key_buffer[..., :length, :], self.value_buffer[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # after reset(): these states start it anew, with the same room
            self.key_buffer, self.value_buffer = (
                _with_room([key_states], self.room),
                _with_room([value_states], self.room),
            )
            self.is_initialized = True
            self._view(key_states.shape[-2])
            return self.keys, self.values
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # past the room reserved: reserve as much again
            self.key_buffer = _with_room([self.keys], end - start + self.room)
            self.value_buffer = _with_room([self.values], end - start + self.room)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self._view(end)
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = indices.to(self.key_buffer.device)
        kept = indices.numel()
        moved = (indices != torch.arange(kept, device=indices.device)).nonzero().flatten()
        if bool((indices[moved] >= kept).all()):
            # Rows stay where they are, or fill a hole from beyond the rows kept (`retirement_order`):
            # only the moved rows are copied, and the buffers shrink to their first rows as views.
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[moved] = buffer[indices[moved]]
            self._rows(lambda buffer: buffer[:kept])
        else:
            self._rows(lambda buffer: buffer.index_select(0, indices))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def _rows(self, select) -> None:
        length = self.get_seq_length()
        self.key_buffer, self.value_buffer = select(self.key_buffer), select(self.value_buffer)
        self._view(length)


def _with_room(row_groups: list[torch.Tensor], room: int) -> torch.Tensor:
    """Groups of rows [B_i, H, T, D] copied, in order, into one new buffer [sum B_i, H, T + room, D]."""
    first = row_groups[0]
    rows, length = sum(group.shape[0] for group in row_groups), first.shape[-2]
    buffer = first.new_empty(rows, *first.shape[1:-2], length + room, first.shape[-1])
    start = 0
    for group in row_groups:
        buffer[start : start + group.shape[0], ..., :length, :] = group
        start += group.shape[0]
    return buffer


def reserve_cache_room(cache, room: int):
    """Reserve ``room`` more positions in each filled full-attention layer of a ``DynamicCache`` (in
    place; other layer kinds stay as they are), so the decoding steps that follow write into it
    instead of copying the cache at each step. Returns ``cache``."""
    return stack_cache_rows([cache], room)


def stack_cache_rows(caches: list, room: int):
    """The first of ``caches`` holding the rows of them all, in order, with ``room`` reserved in
    its filled full-attention layers (`ReservedLayer`); other layer kinds are concatenated."""
    cache = caches[0]
    for i, layer in enumerate(cache.layers):
        groups = [c.layers[i] for c in caches]
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            cache.layers[i] = ReservedLayer(groups, room)
        elif len(caches) > 1 and layer.keys is not None and layer.keys.numel():
            layer.keys = torch.cat([group.keys for group in groups])
            layer.values = torch.cat([group.values for group in groups])
    return cache


def retirement_order(done: torch.Tensor) -> torch.Tensor:
    """The rows to keep when the rows where ``done`` leave a batch, in an order that moves fewest: a
    row that stays keeps its place unless it lies beyond the rows kept, and then fills a hole left
    by a row that ended (so a `ReservedLayer` copies only those rows)."""
    kept = int((~done).sum())
    order = torch.arange(kept, device=done.device)
    holes = done[:kept].nonzero().flatten()
    order[holes] = (~done[kept:]).nonzero().flatten() + kept
    return order
