"""The decode-time KV cache of the running sequences: one row per sequence in per-layer key/value buffers.

Row i holds sequence i's keys and values in columns [start_i, end) of buffers shaped
(rows, kv_heads, columns, head_dim). Every row ends at the same column, so a decode step writes one column for
all rows in place (transformers' DynamicCache instead concatenates the whole cache at every step). A sequence
that joins is copied in once from its own prefill cache, right-aligned at `end`; a sequence that leaves hands
its row to the last row (one row is copied). Columns left of every row's start are dropped when the buffers are
compacted, which also happens when they are full, so the window spans at most the longest running sequence.

The model sees the buffers through a transformers `Cache` whose layers return views of the active rows and
columns; the 2-D attention mask hides the columns of each row before its own start.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _RowLayer(CacheLayerMixin):
    """One model layer's view of a RowCache, as transformers' attention code expects a cache layer to behave."""

    is_sliding = False
    is_compileable = False

    def __init__(self, rows: RowCache, index: int) -> None:
        super().__init__()
        self.rows, self.index = rows, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffers exist before the forward pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.rows.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.rows.end - self.rows.first

    def get_max_length(self) -> int:
        return -1


class RowCache:
    """Keys and values of up to `max_rows` sequences, each in its own row, for `num_layers` layers."""

    def __init__(self, num_layers: int, max_rows: int) -> None:
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.starts: list[int] = []  # first column of each active row
        self.end = 0  # the column the next token of every row goes to

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def first(self) -> int:
        """The first column any active row uses."""
        return min(self.starts, default=self.end)

    def _capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def _relayout(self, new_end: int, rows: int, columns: int, like: torch.Tensor) -> None:
        """Move the active window [first, end) so that it ends at column `new_end` of new buffers."""
        first, span = self.first, self.end - self.first
        shape = (rows, like.shape[1], columns, like.shape[3])
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=like.dtype, device=like.device)
                if store and self.rows:
                    fresh[: self.rows, :, new_end - span : new_end] = store[layer][: self.rows, :, first : self.end]
                if len(store) < self.num_layers:
                    store.append(fresh)
                else:
                    store[layer] = fresh
        self.starts = [s - self.end + new_end for s in self.starts]
        self.end = new_end

    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
        """Append rows from a left-padded prefill cache: per layer (keys, values) shaped (k, heads, L, dim), row j's
        tokens in its last lengths[j] columns. They end at `end` like every other row."""
        new_rows, width = layers[0][0].shape[0], layers[0][0].shape[2]
        if self.rows + new_rows > self.max_rows:
            raise ValueError(f"{self.rows} rows are running; {new_rows} more exceed the {self.max_rows} rows")
        row_cap, col_cap = self._capacity()
        span = max(self.end - self.first, width)
        if self.rows + new_rows > row_cap or self.end < width or not self.keys:
            rows = min(self.max_rows, max(2 * row_cap, self.rows + new_rows))
            self._relayout(span, rows, max(col_cap, 2 * span), layers[0][0])
        for index, (k, v) in enumerate(layers):
            self.keys[index][self.rows : self.rows + new_rows, :, self.end - width : self.end] = k
            self.values[index][self.rows : self.rows + new_rows, :, self.end - width : self.end] = v
        self.starts += [self.end - n for n in lengths]

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers keep their row order the same way)."""
        last = self.rows - 1
        if row != last:
            first = min(self.starts[row], self.starts[last])
            for store in (self.keys, self.values):
                for buffer in store:
                    buffer[row, :, first : self.end] = buffer[last, :, first : self.end]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.end = 0

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more tokens on every row: compact to the left, or grow when half full."""
        _, col_cap = self._capacity()
        if self.end + columns <= col_cap:
            return
        span = self.end - self.first
        grow = 2 * (span + columns) > col_cap
        self._relayout(span, self.keys[0].shape[0], 2 * col_cap if grow else col_cap, self.keys[0])

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's keys and values of every active row at `end`; return the views attention reads."""
        n, width = self.rows, keys.shape[2]
        self.keys[layer][:n, :, self.end : self.end + width] = keys
        self.values[layer][:n, :, self.end : self.end + width] = values
        first = self.first
        return self.keys[layer][:n, :, first : self.end + width], self.values[layer][:n, :, first : self.end + width]

    def advance(self, columns: int = 1) -> None:
        """After a forward pass: the columns written by `write` are part of every row now."""
        self.end += columns

    def attention_mask(self, columns: int = 1) -> torch.Tensor:
        """(rows, window + columns) mask of the next step: 1 where a row has a token (or gets one now)."""
        first = self.first
        positions = torch.arange(first, self.end + columns, device=self.keys[0].device)
        starts = torch.tensor(self.starts, device=positions.device)
        return (positions[None, :] >= starts[:, None]).long()

    def as_cache(self) -> Cache:
        """A transformers Cache over the active rows, for one forward pass."""
        return Cache(layers=[_RowLayer(self, i) for i in range(self.num_layers)])

    def clear(self) -> None:
        self.keys, self.values, self.starts, self.end = [], [], [], 0
