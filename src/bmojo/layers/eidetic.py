"""Long-term eidetic memory, in one place: which past tokens a ``bmojo`` layer keeps verbatim.

The rule (docs/design.md, "Eidetic memory"): innovation ``eps_s = mean_c (f_s - mean(f_{s-1..s-k}))^2``
of the layer's SSM output; the queries of chunk ``c`` (positions ``cw .. cw + w - 1``) see the ``m_e``
positions ``s <= cw - w`` with the largest ``eps_s`` (ties: the earlier position wins). Equivalently,
chunk c's memory is chunk c-1's merged with the candidates ``((c-2)w, (c-1)w]``, which is how every
path below computes it, so they agree exactly:

* :meth:`EideticMemory.select`: a fresh sequence (``ops.innovation_select``), all chunks at once;
* :meth:`EideticMemory.resume`: new tokens after a decoding state (a chat's next turn, chunked
  prefill): chunk by chunk from the state's memory, over the window ring's and the new tokens' scores;
* :meth:`EideticMemory.hand_off`: what a decoder keeps after either: the last ``k`` SSM outputs, the
  window's scores, this chunk's memory and the next chunk's (chosen now: when chunk c begins, the
  window ring holds exactly chunk c+1's new candidates, so no candidate ring is needed);
* :meth:`EideticMemory.step`: one token; at a chunk boundary the next chunk's memory moves in and the
  one after it is chosen. Without a host-known boundary (rows at different positions) the step stays
  tensor-only and applies the change per row.

The choice is not differentiated; the gathered keys and values are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import EideticState, MemorySlots, Ring, gather_positions


@dataclass
class ChunkMemory:
    """The memory each chunk of a run of queries sees: chunk ``i`` is the ``i``-th chunk from the one
    holding the run's first query."""

    k: torch.Tensor  # (b, chunks, m_e, Hkv, D)
    v: torch.Tensor
    valid: torch.Tensor  # (b, chunks, m_e) bool
    pos: torch.Tensor  # (b, chunks, m_e) int64 (0 where invalid)
    eps: torch.Tensor | None = None  # (b, chunks, m_e) fp32 (-inf where invalid); None: read from the scores

    def chunk(self, index: torch.Tensor, scores: torch.Tensor | None = None) -> MemorySlots:
        """Chunk ``index`` (b,) of each row as slots; without ``eps``, the slots' scores come from
        ``scores`` (b, T) of positions 0..T-1."""
        rows = torch.arange(index.shape[0], device=index.device)
        pos, valid = self.pos[rows, index], self.valid[rows, index]
        eps = self.eps[rows, index] if self.eps is not None else torch.gather(scores, 1, pos).masked_fill(~valid, float("-inf"))
        return MemorySlots(k=self.k[rows, index], v=self.v[rows, index], eps=eps, pos=pos)


class EideticMemory:
    """The eidetic memory of one ``bmojo`` layer (no parameters): window ``w``, ``m_e`` slots, ``k`` taps."""

    def __init__(self, config, kernels):
        self.window, self.slots, self.taps = config.sliding_window, config.memory_slots, config.innovation_taps
        self.kernels = kernels  # the model's resolved ops (bmojo.ops.Kernels)

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, memory: MemorySlots, k, v, eps, pos, index: torch.Tensor | None = None) -> MemorySlots:
        """The ``m_e`` best of ``memory`` and n candidates with scores eps (b, n) (-inf: not a
        candidate) at positions pos (b, n), whose keys and values are k, v (b, n, Hkv, D), or rows
        ``index`` (b, n) of k, v when given; only the kept rows are gathered."""
        eps_new, pos_new, idx = self.kernels.on(eps.device).merge_memory(memory.eps, memory.pos, eps, pos, self.slots)
        if index is not None:  # the kept candidates' rows of k and v (memory slots keep idx < m_e)
            idx = torch.where(idx < self.slots, idx, self.slots + torch.gather(index, 1, (idx - self.slots).clamp(min=0)))
        k_new, v_new = _pick_merged(memory.k, k, idx), _pick_merged(memory.v, v, idx)
        if index is not None:  # an empty slot holds zeros, as everywhere else (a non-candidate's row may not)
            empty = (eps_new == float("-inf"))[:, :, None, None]
            k_new, v_new = k_new.masked_fill(empty, 0), v_new.masked_fill(empty, 0)
        return MemorySlots(k=k_new, v=v_new, eps=eps_new, pos=pos_new)

    def _candidates(self, chunk: torch.Tensor, first: int | torch.Tensor, last: torch.Tensor, k_seq, v_seq, eps_seq):
        """Chunk ``chunk`` (b,)'s new candidates, positions ((chunk-2)w, (chunk-1)w], from sequences
        whose index i is position first + i; positions before 0 or after ``last`` (b,) are not candidates.
        Returns what :meth:`merge` takes: k_seq, v_seq, the candidates' scores and positions, and their
        rows in the sequences (keys and values are not gathered: only the kept ones are, by merge)."""
        w = self.window
        first = first if torch.is_tensor(first) else torch.full_like(chunk, first)
        # only positions held by the sequences can be candidates: at most min(w, its length) of them
        lo = torch.maximum((chunk - 2) * w + 1, first)
        pos = lo[:, None] + torch.arange(min(w, eps_seq.shape[1]), device=chunk.device)[None, :]
        index = pos - first[:, None]
        ok = (pos >= 0) & (pos <= last[:, None]) & (pos <= ((chunk - 1) * w)[:, None])
        index = torch.where(ok, index, torch.zeros_like(index))
        eps = torch.gather(eps_seq, 1, index).masked_fill(~ok, float("-inf"))
        return k_seq, v_seq, eps, pos.clamp(min=0), index

    # -- a fresh sequence ---------------------------------------------------------------------------
    def select(self, f: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[ChunkMemory, torch.Tensor]:
        """f (b, T, d), k, v (b, T, Hkv, D) from position 0 -> the memory of every chunk, and the
        innovation scores eps (b, T) fp32."""
        ops = self.kernels.on(f.device)
        positions, valid = ops.innovation_select(f, self.window, self.slots, self.taps)
        eps = ops.innovation_scores(f, self.taps, None)
        return ChunkMemory(k=_gather_chunks(k, positions), v=_gather_chunks(v, positions), valid=valid,
                           pos=positions), eps

    # -- new tokens after a state --------------------------------------------------------------------
    def resume(self, state: EideticState, f: torch.Tensor, k_seq, v_seq, start: torch.Tensor,
               host_start: int | None = None) -> tuple[ChunkMemory, torch.Tensor]:
        """T new tokens at positions start (b,) .. start + T - 1 after ``state``. k_seq, v_seq
        (b, w + T, Hkv, D) are the window's keys and values then the new ones (index i: position
        start - w + i). Returns the memory of every chunk the new queries touch and the scores of the
        same w + T positions (-inf before position 0)."""
        w, T = self.window, f.shape[1]
        eps_new = self.kernels.on(f.device).innovation_scores(f, self.taps, state.history)
        before = (start if host_start is None else host_start) - 1
        held = state.scores.capacity  # = the window ring's: w, or all positions so far while it grows
        eps_seq = torch.cat([state.scores.ordered("eps", before, held), eps_new.to(torch.float32)], 1)
        first, last = start - held, start + T - 1
        c0 = torch.div(start, w, rounding_mode="floor")
        # Chunk c0 + 1's candidates, ((c0-1)w, c0 w], are still in the window ring only if chunk c0
        # begins with the new tokens; otherwise the state chose that chunk's memory when c0 began.
        begins = torch.remainder(start, w) == 0
        memory = [state.upcoming.where(begins, state.current)]
        chosen = self.merge(memory[0], *self._candidates(c0 + 1, first, last, k_seq, v_seq, eps_seq))
        memory.append(chosen.where(begins, state.upcoming))
        for i in range(2, (T + w - 2) // w + 2):  # every chunk T tokens can touch, and the one after
            memory.append(self.merge(memory[-1], *self._candidates(c0 + i, first, last, k_seq, v_seq, eps_seq)))
        stack = {name: torch.stack([getattr(m, name) for m in memory], 1) for name in ("k", "v", "eps", "pos")}
        valid = stack["eps"] > float("-inf")
        return ChunkMemory(valid=valid, **stack), eps_seq

    # -- what the decoder keeps -----------------------------------------------------------------------
    def hand_off(self, state: EideticState, memory: ChunkMemory, f_seq, f_first, eps_seq, kv_seq, kv_first,
                 first_chunk: torch.Tensor | int, last: torch.Tensor, next_in_memory: bool,
                 host_last: int | None = None) -> None:
        """Fill ``state`` as the step-by-step decoder would hold it after position ``last`` (b,).

        f_seq (b, n, d) holds positions f_first + i (index 0 may precede the state's history);
        eps_seq and kv_seq = (k, v) hold positions kv_first + i; ``memory`` starts at chunk
        ``first_chunk`` (b,) and, if ``next_in_memory``, includes the chunk after the last token's."""
        w = self.window
        f_first = f_first[:, None] if torch.is_tensor(f_first) else f_first
        state.history = gather_positions(f_seq, last[:, None] - f_first - self.taps + 1
                                         + torch.arange(self.taps, device=last.device)[None, :]).to(state.history.dtype)
        state.scores.load(last if host_last is None else host_last, first=kv_first, eps=eps_seq)
        chunk = torch.div(last, w, rounding_mode="floor") - first_chunk
        state.current = memory.chunk(chunk, eps_seq)  # a fresh selection's scores start at position 0
        if next_in_memory:  # the memory holds the chunk after the last token's
            state.upcoming = memory.chunk(chunk + 1)
        else:  # chosen now, as the decoder did when this chunk began
            state.upcoming = self.merge(state.current, *self._candidates(chunk + first_chunk + 1, kv_first, last,
                                                                         *kv_seq, eps_seq))

    def step(self, state: EideticState, window: Ring, f: torch.Tensor, t: torch.Tensor,
             boundary: bool | None) -> None:
        """The token at positions t (b,) with SSM output f (b, d), after the window ring received it.
        ``boundary``: whether every row starts a chunk here (False: none does), or None when rows differ."""
        eps = self.kernels.on(f.device).innovation_scores(f[:, None], self.taps, state.history)[:, 0]
        # state tensors are updated in place (their addresses stay: what CUDA graphs replay)
        state.history.copy_(torch.cat([state.history[:, 1:], f[:, None].to(state.history.dtype)], 1))
        state.scores.write(t, eps=eps)
        if boundary is False:
            return
        p = window.positions(t)
        scores = state.scores.eps.masked_fill(p < 0, float("-inf"))
        if boundary:
            state.current.copy_(state.upcoming)
            state.upcoming.copy_(self.merge(state.current, window.k, window.v, scores, p.clamp(min=0)))
            return
        starts = torch.remainder(t, self.window) == 0  # rows at different positions: tensor ops only
        current = state.upcoming.where(starts, state.current)
        upcoming = self.merge(current, window.k, window.v, scores, p.clamp(min=0)).where(starts, state.upcoming)
        state.current.copy_(current)
        state.upcoming.copy_(upcoming)


def _gather_chunks(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (b, T, H, D), positions (b, C, m) -> (b, C, m, H, D)."""
    b, C, m = positions.shape
    idx = positions.reshape(b, C * m, 1, 1).expand(-1, -1, x.shape[2], x.shape[3])
    return torch.gather(x, 1, idx).view(b, C, m, x.shape[2], x.shape[3])


def _pick_merged(mem: torch.Tensor, cand: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of [mem | cand] at idx (b, m), without concatenating: mem (b, m, H, D), cand (b, n, H, D)."""
    slots = mem.shape[1]
    expand = (-1, -1, *mem.shape[2:])
    g_mem = torch.gather(mem, 1, idx.clamp(max=slots - 1)[:, :, None, None].expand(*expand))
    g_cand = torch.gather(cand, 1, (idx - slots).clamp(min=0)[:, :, None, None].expand(*expand))
    return torch.where((idx < slots)[:, :, None, None], g_mem, g_cand.to(g_mem.dtype))
