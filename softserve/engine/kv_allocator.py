"""Bookkeeping of the KV pool: which token slots each running request owns. Plain Python, no torch.

The pool is one flat run of `capacity` token slots per layer (the tensors live in the model runner).
A request gets ONE contiguous extent at admission, sized for everything it can ever hold
(virtual + prompt + max_tokens, capped at max_model_len), and keeps it until it finishes. So decode
never reallocates, rows joining or leaving copy nothing, and attention reads each row's KV as a
plain slice of the pool. The price is reserving max_tokens up front; admission waits when no extent
fits, which is how a full pool turns into queueing instead of an out-of-memory error.
"""

from __future__ import annotations

import bisect


class KVAllocator:
    """First-fit allocator of contiguous extents over `capacity` token slots, coalescing on free."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("KV pool capacity must be positive")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (start, length), never adjacent
        self._owned: dict[str, tuple[int, int]] = {}  # owner -> (start, length)

    @property
    def free_tokens(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def used_tokens(self) -> int:
        return self.capacity - self.free_tokens

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def allocate(self, owner: str, length: int) -> int | None:
        """Start of a new extent of `length` slots for `owner`, or None when no free run is long enough."""
        if owner in self._owned:
            raise ValueError(f"{owner} already owns an extent")
        if length <= 0:
            raise ValueError("extent length must be positive")
        for i, (start, run) in enumerate(self._free):
            if run >= length:
                if run == length:
                    del self._free[i]
                else:
                    self._free[i] = (start + length, run - length)
                self._owned[owner] = (start, length)
                return start
        return None

    def free(self, owner: str) -> None:
        extent = self._owned.pop(owner, None)
        if extent is None:
            return
        start, length = extent
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, length))
        # Merge with the right neighbour, then the left one, so free runs never fragment needlessly.
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            self._free[i] = (start, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev_start, prev_len = self._free[i - 1]
            self._free[i - 1] = (prev_start, prev_len + self._free[i][1])
            del self._free[i]

    def owns(self, owner: str) -> bool:
        return owner in self._owned
