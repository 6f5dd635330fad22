"""A preallocated, right-aligned KV cache whose rows (slots) are refilled in place.

Why not transformers' DynamicCache for decoding: it grows by `torch.cat` every step, i.e. copies the
whole cache per layer per step (~11% of a SmolLM2 decode step at batch 32, profiled), and it has no
way to put a new sequence into a finished row. This cache keeps one buffer per layer of shape
(rows, kv_heads, capacity, head_dim). All rows end at the same column `end` (left padding, as in
HF's batched generate), so a decode step writes one column and hands attention a view
[start:end+1]; no copy. A new prompt of width w goes into a free row at columns [end - w, end);
its earlier columns are masked out. `start` moves right when no live row reaches back that far.

Layers subclass DynamicLayer, so transformers' mask sizing (`get_seq_length`, `get_mask_sizes`)
works unchanged; only `update` and the length bookkeeping differ. Prefill still uses a plain
DynamicCache (one forward, no growth), whose tensors are then copied into the slots.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class Window:
    """Columns [start, end) of every buffer hold the cache; shared by all layers of all models."""

    def __init__(self, start: int, end: int, capacity: int):
        self.start, self.end, self.capacity = start, end, capacity


class SlotLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: Window):
        super().__init__()
        self.keys, self.values, self.window = keys, values, window
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.window
        q = key_states.shape[-2]
        self.keys[:, :, w.end : w.end + q] = key_states
        self.values[:, :, w.end : w.end + q] = value_states
        return self.keys[:, :, w.start : w.end + q], self.values[:, :, w.start : w.end + q]

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start


class SlotCache(Cache):
    """One model's cache: a SlotLayer per decoder layer, all sharing one Window."""

    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)

    @classmethod
    def allocate(cls, like: Cache, rows: int, window: Window) -> "SlotCache":
        """Zeroed buffers shaped like the (prefill) cache `like`, `rows` x window.capacity."""
        layers = []
        for layer in like.layers:
            b, h, _, d = layer.keys.shape
            k = layer.keys.new_zeros((rows, h, window.capacity, d))
            v = layer.values.new_zeros((rows, h, window.capacity, layer.values.shape[-1]))
            layers.append(SlotLayer(k, v, window))
        return cls(layers)

    def place(self, prefill: Cache, src_rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy prefill rows `src_rows` (width w, right-aligned) into `slots` at columns [end - w, end)."""
        end = self.layers[0].window.end
        for dst, src in zip(self.layers, prefill.layers):
            w = src.keys.shape[-2]
            dst.keys[slots, :, end - w : end] = src.keys[src_rows]
            dst.values[slots, :, end - w : end] = src.values[src_rows]

    def rebuild(self, rows: torch.Tensor, new_end: int, capacity: int) -> None:
        """New buffers holding only `rows`, the window's columns moved to end at `new_end`.

        The caller then updates the shared Window (start = new_end - width, end = new_end).
        """
        w = self.layers[0].window
        width = w.end - w.start
        for layer in self.layers:
            for name in ("keys", "values"):
                buf = getattr(layer, name)
                fresh = buf.new_zeros((len(rows), buf.shape[1], capacity, buf.shape[3]))
                fresh[:, :, new_end - width : new_end] = buf[rows, :, w.start : w.end]
                setattr(layer, name, fresh)


def is_plain_dynamic(cache: object) -> bool:
    """A cache the engine can copy into slots: full attention only, one DynamicLayer per layer."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)
