"""Paged latent cache: the per-token MLA latents that ``flash_mla_with_kvcache`` reads.

Layout (the contract's): each layer's pages are one ``[num_pages, 64, 1, 576]`` array; a token of
request ``i`` at position ``p`` lives at ``pages[block_table[i, p // 64], p % 64, 0]``. Page
allocation is a free-list stack kept on the device, so a whole decode step (allocation, appends,
attention, freeing of finished requests) runs inside one ``jax.jit``.

Two layouts, as the user chooses (``PagedLatentCache.create(..., shared_layout=...)``):

- shared (default): one ``PageTable`` for all layers; every layer's pages are indexed by the same
  page ids. One allocation per step, one block table per request.
- per layer: one ``PageTable`` per layer; each layer allocates from its own pool (for example when
  layers live in different memories). Lengths are the same in every table.

Errors that a traced computation cannot raise (the page pool is exhausted, a request outgrew its
block-table row) set a sticky bit in ``PageTable.status``; the affected tokens are not written and
their block-table entries stay ``POISON_PAGE``, so attention over them gives NaN rows (the ops'
contract for page ids out of range) instead of reading someone else's page. ``check()`` raises
``OutOfPagesError`` on the host; in eager code ``append`` raises it at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ._config import HEAD_DIM, PAGE_BLOCK_SIZE

__all__ = ["POISON_PAGE", "OutOfPagesError", "PageTable", "WriteSlots", "StepView", "PagedLatentCache"]

# Block-table entry of a block with no page: far outside any pool, never dereferenced by the ops
# (they read only the first ceil(L / 64) entries), and dropped by every scatter here.
POISON_PAGE = 2147480000
# PageTable.status bits.
STATUS_POOL_EXHAUSTED = 1
STATUS_ROW_FULL = 2


class OutOfPagesError(RuntimeError):
    """The page pool (or a request's block-table row) had no room for the tokens appended."""


def is_concrete(*xs) -> bool:
    """Whether every array in ``xs`` holds values (eager code), so value checks can raise."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _cdiv_pages(n: jax.Array) -> jax.Array:
    return (n + PAGE_BLOCK_SIZE - 1) // PAGE_BLOCK_SIZE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WriteSlots:
    """Where the new tokens of one step go. Slots of tokens that are not written (padding, or
    tokens that found no page) hold ``POISON_PAGE`` and are dropped by the scatter."""

    page: jax.Array  # [batch, t] int32 page id, or POISON_PAGE
    offset: jax.Array  # [batch, t] int32 slot within the page, in [0, 64)

    def write(self, pages: jax.Array, latent: jax.Array) -> jax.Array:
        """Scatters ``latent`` into ``pages``.

        Args:
          pages: [num_pages, 64, 1, 576] array, one layer's pages.
          latent: [batch, t, 576] array: compressed KV (512) then RoPE key (64) of each new token.

        Returns:
          The updated pages (in place when the caller donates them).
        """
        if latent.shape != self.page.shape + (pages.shape[-1],):
            raise ValueError(
                f"WriteSlots.write: latent must have shape {self.page.shape + (pages.shape[-1],)}; "
                f"got latent.shape={tuple(latent.shape)}"
            )
        return pages.at[self.page, self.offset, 0, :].set(latent.astype(pages.dtype), mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepView:
    """What one layer needs to know about the cache in one step (prefill or decode)."""

    block_table: jax.Array  # [batch, max_blocks_per_seq] int32
    seqlens: jax.Array  # [batch] int32, tokens in each request's cache, this step's included
    num_new: jax.Array  # [batch] int32, tokens appended this step (<= t)
    slots: WriteSlots  # [batch, t] where this step's tokens go

    @property
    def positions(self) -> jax.Array:
        """[batch, t] int32 position of each new token (padding tokens continue the count)."""
        t = self.slots.page.shape[1]
        return (self.seqlens - self.num_new)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageTable:
    """Block tables, lengths and the free-page stack of one page pool. A pytree: pass it through
    ``jax.jit``; every method is jittable."""

    block_table: jax.Array  # [batch, max_blocks_per_seq] int32; POISON_PAGE where no page
    lengths: jax.Array  # [batch] int32 tokens cached per request
    free_pages: jax.Array  # [num_pages] int32; free_pages[:num_free] is the stack of free ids
    num_free: jax.Array  # [] int32
    status: jax.Array  # [] int32 sticky error bits (STATUS_*)

    @classmethod
    def create(cls, batch: int, num_pages: int, max_blocks_per_seq: int) -> "PageTable":
        """An empty table: every page free, every request of length 0."""
        for name, v in (("batch", batch), ("num_pages", num_pages), ("max_blocks_per_seq", max_blocks_per_seq)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PageTable.create: {name} must be a positive int; got {v!r}")
        if num_pages >= POISON_PAGE:
            raise ValueError(f"PageTable.create: num_pages must be < {POISON_PAGE}; got {num_pages}")
        return cls(
            block_table=jnp.full((batch, max_blocks_per_seq), POISON_PAGE, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            # Popped from the end: page 0 is handed out first.
            free_pages=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),
            num_free=jnp.asarray(num_pages, jnp.int32),
            status=jnp.asarray(0, jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_table.shape[1]

    @property
    def num_pages(self) -> int:
        return self.free_pages.shape[0]

    def pages_in_use(self) -> jax.Array:
        return self.num_pages - self.num_free

    def append(self, num_new: jax.Array, t: int) -> tuple["PageTable", StepView]:
        """Makes room for ``num_new[i]`` more tokens of request ``i`` and counts them in.

        Pages are taken from the free stack in request order. When the pool runs dry, the request
        that does not fit and the later ones that need a new page get none: their new tokens are
        not written and ``status`` records why; requests that need no new page go on.

        Args:
          num_new: [batch] int32 array, tokens appended per request, each in [0, t].
          t: static number of new-token slots per request in this step.

        Returns:
          ``(table, view)``: the table with the new pages and lengths, and the step's view.
        """
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 1:
            raise ValueError(f"PageTable.append: t must be a positive static int; got {t!r}")
        num_new = jnp.asarray(num_new)
        if num_new.shape != (self.batch,) or num_new.dtype != jnp.int32:
            raise ValueError(
                f"PageTable.append: num_new must be int32 [batch={self.batch}]; "
                f"got shape {tuple(num_new.shape)}, dtype {num_new.dtype}"
            )
        if is_concrete(num_new) and not bool(jnp.all((num_new >= 0) & (num_new <= t))):
            raise ValueError(f"PageTable.append: num_new must lie in [0, t={t}]; got {np.asarray(num_new).tolist()}")
        max_blocks, num_pages = self.max_blocks_per_seq, self.num_pages
        old_blocks = jnp.minimum(_cdiv_pages(self.lengths), max_blocks)
        want_blocks = _cdiv_pages(self.lengths + num_new)
        row_full = want_blocks > max_blocks
        need = jnp.maximum(jnp.minimum(want_blocks, max_blocks) - old_blocks, 0)
        # Pages go to requests in batch order while the pool lasts: the first request that does
        # not fit, and every later one that needs a page, get none (a prefix test keeps this one
        # vectorised pass; requests that need no new page are never affected).
        fits = jnp.cumsum(need) <= self.num_free
        need = jnp.where(fits, need, 0)
        before = jnp.cumsum(need) - need  # pages taken by earlier requests

        # New block k of request i: block index old_blocks[i] + k, popped id at stack depth
        # before[i] + k. At most ceil(t / 64) + 1 new blocks per request per step.
        k = jnp.arange(-(-t // PAGE_BLOCK_SIZE) + 1, dtype=jnp.int32)
        take = k[None, :] < need[:, None]
        depth = self.num_free - 1 - (before[:, None] + k[None, :])
        new_ids = jnp.where(take, self.free_pages[jnp.clip(depth, 0, num_pages - 1)], POISON_PAGE)
        rows = jnp.broadcast_to(jnp.arange(self.batch)[:, None], take.shape)
        cols = jnp.where(take, old_blocks[:, None] + k[None, :], max_blocks)  # max_blocks: dropped
        block_table = self.block_table.at[rows, cols].set(new_ids, mode="drop")

        lengths = self.lengths + num_new
        status = self.status
        status |= jnp.where(jnp.any(~fits), STATUS_POOL_EXHAUSTED, 0)
        status |= jnp.where(jnp.any(row_full), STATUS_ROW_FULL, 0)
        table = dataclasses.replace(
            self, block_table=block_table, lengths=lengths, num_free=self.num_free - need.sum(), status=status
        )

        j = jnp.arange(t, dtype=jnp.int32)
        pos = self.lengths[:, None] + j[None, :]
        block = pos // PAGE_BLOCK_SIZE
        page = jnp.take_along_axis(block_table, jnp.clip(block, 0, max_blocks - 1), axis=1)
        valid = (j[None, :] < num_new[:, None]) & (block < max_blocks) & (page >= 0) & (page < num_pages)
        slots = WriteSlots(page=jnp.where(valid, page, POISON_PAGE), offset=pos % PAGE_BLOCK_SIZE)
        view = StepView(block_table=block_table, seqlens=lengths, num_new=num_new, slots=slots)
        if is_concrete(self, num_new):
            table.check()
        return table, view

    def free(self, done: jax.Array) -> "PageTable":
        """Returns the pages of the requests where ``done`` is true to the pool; their lengths
        become 0 and their block-table rows ``POISON_PAGE``.

        Args:
          done: [batch] bool array.
        """
        done = jnp.asarray(done)
        if done.shape != (self.batch,) or done.dtype != jnp.bool_:
            raise ValueError(
                f"PageTable.free: done must be bool [batch={self.batch}]; got shape {tuple(done.shape)}, dtype {done.dtype}"
            )
        k = jnp.arange(self.max_blocks_per_seq, dtype=jnp.int32)
        held = k[None, :] < _cdiv_pages(self.lengths)[:, None]
        ids = self.block_table
        # Entries that never got a page (allocation failed) hold POISON_PAGE: nothing to return.
        give = done[:, None] & held & (ids >= 0) & (ids < self.num_pages)
        flat = give.reshape(-1)
        dest = jnp.where(flat, self.num_free + jnp.cumsum(flat) - 1, self.num_pages)  # num_pages: dropped
        free_pages = self.free_pages.at[dest].set(ids.reshape(-1), mode="drop")
        return dataclasses.replace(
            self,
            block_table=jnp.where(done[:, None], POISON_PAGE, self.block_table),
            lengths=jnp.where(done, 0, self.lengths),
            free_pages=free_pages,
            num_free=self.num_free + flat.sum(dtype=jnp.int32),
        )

    def check(self) -> None:
        """Raises ``OutOfPagesError`` if an append ever failed (reads one scalar from the device)."""
        status = int(self.status)
        if status == 0:
            return
        reasons = []
        if status & STATUS_POOL_EXHAUSTED:
            reasons.append(
                f"the page pool is exhausted ({self.num_pages} pages of {PAGE_BLOCK_SIZE} tokens, "
                f"{int(self.num_free)} free now): create the cache with more pages, or free finished requests"
            )
        if status & STATUS_ROW_FULL:
            reasons.append(
                f"a request outgrew its block-table row (max_blocks_per_seq={self.max_blocks_per_seq}, "
                f"i.e. {self.max_blocks_per_seq * PAGE_BLOCK_SIZE} tokens; lengths now "
                f"{np.asarray(self.lengths).tolist()})"
            )
        raise OutOfPagesError("paged latent cache: " + "; ".join(reasons) + ". The tokens that found no page were not written.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """The latent caches of all layers of a model, with one shared page table or one per layer."""

    pages: tuple  # num_layers x [num_pages, 64, 1, 576] arrays
    tables: tuple  # 1 PageTable (shared layout) or num_layers (one per layer)

    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        num_pages: int,
        max_blocks_per_seq: int,
        *,
        dtype=jnp.bfloat16,
        shared_layout: bool = True,
        fill: float = 0.0,
    ) -> "PagedLatentCache":
        """An empty cache.

        Args:
          num_layers: layers of the model (one page array each).
          batch: request slots.
          num_pages: pages per layer (each 64 tokens x 576 values).
          max_blocks_per_seq: block-table row width: a request holds at most 64 times this many tokens.
          dtype: bfloat16 or float16, the dtype of the attention's queries.
          shared_layout: one page table for all layers (True) or one per layer (False).
          fill: initial value of every slot (tests use NaN: unwritten slots must never be read).
        """
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"PagedLatentCache.create: num_layers must be a positive int; got {num_layers!r}")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise TypeError(f"PagedLatentCache.create: dtype must be bfloat16 or float16; got {jnp.dtype(dtype)}")
        shape = (num_pages, PAGE_BLOCK_SIZE, 1, HEAD_DIM)
        pages = tuple(jnp.full(shape, fill, dtype) for _ in range(num_layers))
        # Distinct buffers per table: a jitted step donates each of them.
        tables = tuple(
            PageTable.create(batch, num_pages, max_blocks_per_seq) for _ in range(1 if shared_layout else num_layers)
        )
        return cls(pages=pages, tables=tables)

    @property
    def num_layers(self) -> int:
        return len(self.pages)

    @property
    def shared_layout(self) -> bool:
        return len(self.tables) == 1

    @property
    def lengths(self) -> jax.Array:
        """[batch] int32 tokens per request (equal in every table)."""
        return self.tables[0].lengths

    def table(self, layer: int) -> PageTable:
        return self.tables[0 if self.shared_layout else layer]

    def append(self, num_new: jax.Array, t: int) -> tuple["PagedLatentCache", tuple]:
        """Allocates room for this step's tokens in every table.

        Returns:
          ``(cache, views)``: ``views[layer]`` is that layer's ``StepView``; layer ``l`` then
          stores its tokens with ``cache.with_pages(l, views[l].slots.write(cache.pages[l], latent))``.
        """
        tables, views = [], []
        for table in self.tables:
            table, view = table.append(num_new, t)
            tables.append(table)
            views.append(view)
        if self.shared_layout:
            views = views * self.num_layers
        return dataclasses.replace(self, tables=tuple(tables)), tuple(views)

    def with_pages(self, layer: int, pages: jax.Array) -> "PagedLatentCache":
        new = list(self.pages)
        new[layer] = pages
        return dataclasses.replace(self, pages=tuple(new))

    def free(self, done: jax.Array) -> "PagedLatentCache":
        """Frees the requests where ``done`` [batch] bool is true, in every table."""
        return dataclasses.replace(self, tables=tuple(t.free(done) for t in self.tables))

    def pages_in_use(self) -> jax.Array:
        """[] int32 pages held, summed over tables."""
        return sum(t.pages_in_use() for t in self.tables)

    def check(self) -> None:
        """Raises ``OutOfPagesError`` if any table ran out of room."""
        for t in self.tables:
            t.check()
