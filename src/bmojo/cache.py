"""The decoding state (docs/design.md, "Decoding state"), held in transformers' cache API.

Every piece of state is a small typed object, allocated from the config, owned by its layer's
:class:`LayerState`, which the :class:`BMojoCache` owns. Only ``attention`` layers grow (their KV
cache); every other layer type costs the same per token at position 100 and 100,000:

=================== ===========================================================================
mamba               :class:`ConvSSMState`: conv (b, d_inner, d_conv-1), ssm (b, d_inner, N) fp32
mamba2              :class:`ConvSSMState`: conv (b, x‖B‖C channels, K-1), ssm (b, heads, head_dim, N) fp32
sliding_attention   :class:`Ring` of the last w keys/values (b, w, Hkv, D)
bmojo_f             mamba + window ring + :class:`FadingState`: a ring of fading keys/values for the
                    m_f positions before the window, and for the window's tokens whichever is
                    smaller: their SSM outputs (projected to fading keys/values as they leave the
                    window) or those keys/values (projected on arrival), see
                    :func:`fading_keeps_ssm_outputs`
bmojo               bmojo_f + :class:`EideticState`: the last ``taps`` SSM outputs, the window's
                    innovation scores, and m_e memory slots for this chunk and the next
attention           :class:`KVCache`: keys/values (b, S, Hkv, D), grown by doubling or preallocated
=================== ===========================================================================

A ring of capacity ``n`` holds, after position ``t``, in slot ``j`` the latest position p <= t with
p % n == j, i.e. p = t - ((t - j) mod n) (negative: empty). A ring whose size would exceed what a
sequence can need starts smaller and doubles up to its size, so a huge window costs nothing up front;
before it reaches its size it has never wrapped, so the formula holds at every capacity.

Rows of a batch may sit at different positions (padded prompts): positions are per-row tensors, and
every update is a tensor operation (no host synchronisation while decoding).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

# The config fields that shape a decoding state: a cache serves only models that agree on all of them.
STATE_FIELDS = ("layer_types", "hidden_size", "num_key_value_heads", "head_dim", "sliding_window", "fading_window",
                "memory_slots", "innovation_taps", "d_state", "d_conv", "expand", "tie_fading_kv", "fading_mixer",
                "mamba2_num_heads", "mamba2_head_dim", "mamba2_state_size", "mamba2_n_groups", "mamba2_xb_heads",
                "mamba2_conv_kernel")
RING_START = 64  # a ring larger than this starts at the length the first prompt needs


def ring_positions(last: torch.Tensor, capacity: int) -> torch.Tensor:
    """Positions held by the ``capacity`` slots of a ring after position ``last`` (b,) -> (b, capacity);
    negative = empty."""
    j = torch.arange(capacity, device=last.device)
    return last[:, None] - torch.remainder(last[:, None] - j, capacity)


def fading_keeps_ssm_outputs(config) -> bool:
    """Whether a fading layer's decoder keeps the window's SSM outputs f (d floats per token) rather than
    their fading keys and values (2 Hkv D): the smaller of the two (f when d <= 2 Hkv D, as without GQA)."""
    return config.hidden_size <= 2 * config.num_key_value_heads * config.head_dim


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, T, ...) at per-row indices (b, n) -> (b, n, ...); zeros where an index is < 0."""
    shape = (*index.shape, *[1] * (x.dim() - 2))
    idx = index.clamp(min=0).view(shape).expand(-1, -1, *x.shape[2:])
    out = torch.gather(x, 1, idx)
    return torch.where((index >= 0).view(shape), out, out.new_zeros(()))


class RowState:
    """A dataclass of batch-first tensors (``None`` for absent parts) and nested row states."""

    def _fields(self):
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def map_rows(self, fn) -> None:
        """Apply ``fn`` to every tensor (rows reordered, repeated or selected for beam search)."""
        for name, value in self._fields():
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))
            elif isinstance(value, RowState):
                value.map_rows(fn)

    def nbytes(self) -> int:
        total = 0
        for _, value in self._fields():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, RowState):
                total += value.nbytes()
        return total


@dataclass
class ConvSSMState(RowState):
    """A Mamba mixer's state: the last d_conv - 1 conv inputs and the SSM state (fp32)."""

    conv: torch.Tensor  # (b, d_inner, d_conv - 1)
    ssm: torch.Tensor  # (b, d_inner, N) fp32

    @classmethod
    def allocate(cls, config, batch: int, device, dtype, mixer: str = "mamba") -> "ConvSSMState":
        """A Mamba-1 mixer's state: conv (b, d_inner, d_conv-1), ssm (b, d_inner, N); a Mamba-2 mixer's:
        conv (b, x‖B‖C channels, K-1), ssm (b, heads, head_dim, state_size)."""
        c = config
        if mixer == "mamba2":
            channels = (c.mamba2_xb_heads or c.mamba2_num_heads) * c.mamba2_head_dim + \
                ((c.mamba2_xb_heads or c.mamba2_n_groups) + c.mamba2_n_groups) * c.mamba2_state_size
            return cls(conv=torch.zeros(batch, channels, c.mamba2_conv_kernel - 1, device=device, dtype=dtype),
                       ssm=torch.zeros(batch, c.mamba2_num_heads, c.mamba2_head_dim, c.mamba2_state_size,
                                       device=device, dtype=torch.float32))
        return cls(conv=torch.zeros(batch, c.d_inner, c.d_conv - 1, device=device, dtype=dtype),
                   ssm=torch.zeros(batch, c.d_inner, c.d_state, device=device, dtype=torch.float32))


@dataclass
class Ring(RowState):
    """Per-token tensors of the last ``size`` positions, position p in slot p % capacity.

    ``data`` holds one (b, capacity, ...) tensor per name (keys and values, SSM outputs, scores);
    ``fill`` is what an empty slot holds."""

    size: int
    data: dict
    fill: float = 0.0

    def _fields(self):
        return list(self.data.items())

    def map_rows(self, fn) -> None:
        self.data = {name: fn(x) for name, x in self.data.items()}

    @property
    def capacity(self) -> int:
        return next(iter(self.data.values())).shape[1]

    def __getattr__(self, name):  # ring.k, ring.v, ...
        data = self.__dict__.get("data")
        if data is not None and name in data:
            return data[name]
        raise AttributeError(name)

    @classmethod
    def allocate(cls, size: int, batch: int, capacity: int, fill: float = 0.0, **shapes) -> "Ring":
        """``shapes``: name -> (trailing shape, dtype, device)."""
        data = {name: torch.full((batch, capacity, *tail), fill, dtype=dtype, device=device)
                for name, (tail, dtype, device) in shapes.items()}
        return cls(size=size, data=data, fill=fill)

    def reserve(self, positions: int) -> None:
        """Make room for positions 0 .. positions - 1 (host-known), doubling up to ``size``."""
        cap = self.capacity
        if cap >= self.size or positions <= cap:
            return
        new = min(self.size, max(positions, 2 * cap))
        self.data = {name: torch.cat([x, x.new_full((x.shape[0], new - cap, *x.shape[2:]), self.fill)], 1)
                     for name, x in self.data.items()}

    def positions(self, last: torch.Tensor) -> torch.Tensor:
        """Position held by each slot after position ``last`` (b,): (b, capacity), < 0 = empty."""
        return ring_positions(last, self.capacity)

    def write(self, t: torch.Tensor, **values: torch.Tensor) -> None:
        """Store each row's token at position t (b,) (values (b, ...))."""
        rows = torch.arange(t.shape[0], device=t.device)
        slot = torch.remainder(t, self.capacity)
        for name, x in values.items():
            self.data[name][rows, slot] = x.to(self.data[name].dtype)

    def read_slot(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """What the slot of position t (b,) holds now (before it is overwritten by t)."""
        rows = torch.arange(t.shape[0], device=t.device)
        return self.data[name][rows, torch.remainder(t, self.capacity)]

    def load(self, last: torch.Tensor | int, first: int | torch.Tensor = 0, **sequences: torch.Tensor) -> None:
        """Fill from per-token sequences (b, n, ...) whose index i is position first + i, as the ring
        holds them after position ``last``; positions before 0 or before ``first`` hold ``fill``.
        ``last`` and ``first`` are per row (b,) tensors, or ints when every row sits at the same position
        (then slices: the held positions, oldest first, are a slice of each sequence after the empty
        ones, and slot p % capacity is a rotation of that). Either way the ring's own tensors are written
        in place: their strides and addresses stay (what compiled steps and CUDA graphs hold)."""
        cap = self.capacity
        if isinstance(last, int) and not torch.is_tensor(first):
            lo = last - cap + 1
            n_empty = min(max(max(first, 0) - lo, 0), cap)
            rot = (last + 1) % cap  # the slot of the oldest position held
            for name, x in sequences.items():
                seq = x[:, lo + n_empty - first : last + 1 - first]
                if n_empty:
                    seq = torch.cat([seq.new_full((x.shape[0], n_empty, *x.shape[2:]), self.fill), seq], 1)
                buf = self.data[name]
                buf[:, rot:] = seq[:, : cap - rot]
                buf[:, :rot] = seq[:, cap - rot :]
            return
        last = last if torch.is_tensor(last) else torch.full_like(first, last)
        p = self.positions(last)
        index = p - (first[:, None] if torch.is_tensor(first) else first)
        index = torch.where(p >= 0, index, torch.full_like(index, -1))
        for name, x in sequences.items():
            out = gather_positions(x, index).to(self.data[name].dtype)  # zeros where index < 0
            if self.fill != 0:
                out = out.masked_fill((index < 0).view(*p.shape, *[1] * (out.dim() - 2)), self.fill)
            self.data[name].copy_(out)

    def ordered(self, name: str, last: torch.Tensor | int, count: int) -> torch.Tensor:
        """The ``count`` latest positions up to ``last`` (per row (b,), or an int for every row), oldest
        first: (b, count, ...); empty ones (never written, or before position 0) hold ``fill``. With an
        int ``last`` the result may be a view of the ring (read it, or copy it before writing to it)."""
        x = self.data[name]
        if isinstance(last, int):  # slices of the ring (at most two, where it wraps) after the empty ones
            cap = self.capacity
            lo = max(last - count + 1, 0, last - cap + 1)  # the oldest position held
            n_empty = min(lo - (last - count + 1), count)
            pieces = [x.new_full((x.shape[0], n_empty, *x.shape[2:]), self.fill)] if n_empty else []
            if lo <= last:
                s0, n = lo % cap, last - lo + 1
                pieces.append(x[:, s0 : min(s0 + n, cap)])
                if s0 + n > cap:
                    pieces.append(x[:, : s0 + n - cap])
            return torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0] if pieces else x[:, :0]
        p = last[:, None] - count + 1 + torch.arange(count, device=last.device)[None, :]
        held = torch.remainder(p, self.capacity)
        out = torch.gather(x, 1, held.view(*held.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
        empty = (p < 0) | (p <= last[:, None] - self.capacity)
        return out.masked_fill(empty.view(*p.shape, *[1] * (x.dim() - 2)), self.fill)


@dataclass
class KVCache(RowState):
    """A full-attention layer's keys and values, left-aligned: the cache's slot j holds row position
    j - (seen - position) (rows with padding start later), ``valid`` marks held slots."""

    k: torch.Tensor  # (b, capacity, Hkv, D)
    v: torch.Tensor
    valid: torch.Tensor  # (b, capacity) bool
    static: bool = False  # preallocated to a fixed maximum length (compiled decoding); never grows

    @classmethod
    def allocate(cls, config, batch: int, capacity: int, device, dtype, static: bool = False) -> "KVCache":
        shape = (batch, capacity, config.num_key_value_heads, config.head_dim)
        return cls(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype),
                   valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device), static=static)

    def reserve(self, length: int) -> None:
        """Room for ``length`` slots, doubling (amortised O(1) appends); a static cache raises instead."""
        cap = self.k.shape[1]
        if length <= cap:
            return
        if self.static:
            raise ValueError(f"BMojoCache: the attention cache was allocated for {cap} tokens (max_length) "
                             f"and cannot hold {length}; allocate it with a larger max_length")
        extra = max(cap, length - cap, 16)
        self.k, self.v = (torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], 1) for x in (self.k, self.v))
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], 1)


@dataclass
class FadingState(RowState):
    """Fading keys/values of the m_f positions before the window, and the window's tokens in waiting:
    their SSM outputs ``window_f`` (projected when they leave the window) or their fading keys/values
    ``window_kv`` (projected on arrival), whichever is smaller."""

    ring: Ring  # k, v (b, m_f, Hkv, D)
    window_f: Ring | None = None  # f (b, w, d)
    window_kv: Ring | None = None  # k, v (b, w, Hkv, D)


@dataclass
class MemorySlots(RowState):
    """m_e eidetic slots: keys, values, innovation (fp32, -inf = empty) and position."""

    k: torch.Tensor  # (b, m_e, Hkv, D)
    v: torch.Tensor
    eps: torch.Tensor  # (b, m_e) fp32
    pos: torch.Tensor  # (b, m_e) int64

    @classmethod
    def empty(cls, config, batch: int, device, dtype) -> "MemorySlots":
        m, kv = config.memory_slots, (config.num_key_value_heads, config.head_dim)
        return cls(k=torch.zeros(batch, m, *kv, device=device, dtype=dtype),
                   v=torch.zeros(batch, m, *kv, device=device, dtype=dtype),
                   eps=torch.full((batch, m), float("-inf"), device=device),
                   pos=torch.zeros(batch, m, dtype=torch.long, device=device))

    @property
    def valid(self) -> torch.Tensor:
        return self.eps > float("-inf")

    def copy_(self, other: "MemorySlots") -> None:
        """Take ``other``'s contents in place."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))

    def where(self, rows: torch.Tensor, other: "MemorySlots") -> "MemorySlots":
        """These slots where ``rows`` (b,) is True, ``other``'s elsewhere."""
        pick = {f.name: torch.where(rows.view(-1, *[1] * (getattr(self, f.name).dim() - 1)),
                                    getattr(self, f.name), getattr(other, f.name))
                for f in dataclasses.fields(self)}
        return MemorySlots(**pick)


@dataclass
class EideticState(RowState):
    """What a bmojo layer's long-term memory needs while decoding (see :mod:`bmojo.eidetic`)."""

    history: torch.Tensor  # (b, taps, d): the last SSM outputs, oldest first (the predictor's taps)
    scores: Ring  # eps (b, w) fp32: the window's innovation scores, the next selection's candidates
    current: MemorySlots  # the memory of the chunk being decoded
    upcoming: MemorySlots  # the next chunk's, selected when this chunk began


@dataclass
class LayerState(RowState):
    """One layer's decoding state; the parts its layer type uses, the others None."""

    layer_type: str
    mamba: ConvSSMState | None = None
    window: Ring | None = None  # k, v
    fading: FadingState | None = None
    eidetic: EideticState | None = None
    kv: KVCache | None = None

    # transformers' Cache API reads these of its layers
    is_compileable = False
    is_sliding = False

    @classmethod
    def allocate(cls, config, layer_type: str, batch: int, device, dtype, tokens: int,
                 max_length: int | None = None) -> "LayerState":
        """The state of a ``layer_type`` layer for ``batch`` rows, ready to hold ``tokens`` tokens; with
        ``max_length``, sized for that many once and for all (compiled decoding)."""
        c = config
        state = cls(layer_type)
        kv_shape = ((c.num_key_value_heads, c.head_dim), dtype, device)
        need = max_length if max_length is not None else max(tokens, RING_START)
        if layer_type == "attention":
            state.kv = KVCache.allocate(c, batch, max_length if max_length is not None else tokens, device, dtype,
                                        static=max_length is not None)
            return state
        if layer_type in ("mamba", "mamba2"):
            state.mamba = ConvSSMState.allocate(c, batch, device, dtype, layer_type)
            return state
        if layer_type in ("bmojo_f", "bmojo"):
            state.mamba = ConvSSMState.allocate(c, batch, device, dtype, c.fading_mixer)
        w = c.sliding_window
        state.window = Ring.allocate(w, batch, min(w, need), k=kv_shape, v=kv_shape)
        if layer_type in ("bmojo_f", "bmojo") and c.effective_fading_window > 0:
            m_f = c.effective_fading_window
            state.fading = FadingState(ring=Ring.allocate(m_f, batch, min(m_f, max(need - w, 1)), k=kv_shape, v=kv_shape))
            if fading_keeps_ssm_outputs(c):
                state.fading.window_f = Ring.allocate(w, batch, min(w, need), f=((c.hidden_size,), dtype, device))
            else:
                state.fading.window_kv = Ring.allocate(w, batch, min(w, need), k=kv_shape, v=kv_shape)
        if layer_type == "bmojo":
            state.eidetic = EideticState(
                history=torch.zeros(batch, c.innovation_taps, c.hidden_size, device=device, dtype=dtype),
                scores=Ring.allocate(w, batch, min(w, need), fill=float("-inf"), eps=((), torch.float32, device)),
                current=MemorySlots.empty(c, batch, device, dtype),
                upcoming=MemorySlots.empty(c, batch, device, dtype))
        return state

    def _fields(self):
        return [(name, value) for name, value in super()._fields() if name != "layer_type"]

    def rings(self) -> list[Ring]:
        out = [self.window]
        if self.fading is not None:
            out += [self.fading.ring, self.fading.window_f, self.fading.window_kv]
        if self.eidetic is not None:
            out.append(self.eidetic.scores)
        return [r for r in out if r is not None]


class BMojoCache(Cache):
    """The decoding state of a bmojo model: one :class:`LayerState` per layer, the position of each
    row's next token, and the number of tokens consumed (``get_seq_length()``).

    ``BMojoCache(config)`` allocates at the first prompt (its batch size, device and dtype);
    ``BMojoCache(config, batch_size, device=..., dtype=...)`` allocates now, and with ``max_length``
    sizes every part for that many tokens once and for all (what compiled decoding needs). The model
    creates one for ``use_cache=True`` and ``generate()``."""

    def __init__(self, config, batch_size: int | None = None, device=None, dtype=None,
                 max_length: int | None = None):
        self.config = config
        self.max_length = max_length
        self.seen_tokens = 0
        self.kv_slot: torch.Tensor | None = None  # seen_tokens as a 0-d tensor: a compiled step reads it
        # Per row, the position of the next token in that row's own frame (padding excluded).
        self.positions: torch.Tensor | None = None
        # A padded prompt's (first token, number of tokens) per row, in the caller's layout; None if unpadded.
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        # seen_tokens - positions when it is the same for every row (host-known: unpadded prompts), so a
        # decoding step knows on the host whether rows start a memory chunk; None when rows differ.
        self.uniform_offset: int | None = None
        self.layer_states: list[LayerState] | None = None
        super().__init__(layers=[])
        if batch_size is not None:
            self.allocate(batch_size, device, dtype or torch.get_default_dtype(), tokens=0)

    # -- allocation and bookkeeping ---------------------------------------------------------------
    def allocate(self, batch: int, device, dtype, tokens: int) -> None:
        """Allocate every layer's state for ``batch`` rows (``tokens``: the first prompt's length)."""
        if self.max_length is not None and tokens > self.max_length:
            raise ValueError(f"BMojoCache: a prompt of {tokens} tokens exceeds max_length={self.max_length}")
        self.layer_states = [LayerState.allocate(self.config, t, batch, device, dtype, tokens, self.max_length)
                             for t in self.config.layer_types]
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.kv_slot = torch.zeros((), dtype=torch.long, device=device)

    @property
    def is_compileable(self) -> bool:
        """Every part has its final size (``max_length`` given): a decoding step can be compiled once."""
        return self.max_length is not None

    @property
    def is_allocated(self) -> bool:
        return self.layer_states is not None

    def check_batch(self, batch: int, config) -> None:
        """Raise if this cache cannot serve a forward of ``batch`` rows of a model with ``config``."""
        if config is not self.config:
            for field in STATE_FIELDS:
                ours, theirs = getattr(self.config, field, None), getattr(config, field, None)
                if ours != theirs:
                    raise ValueError(f"BMojoCache: built for a model with {field}={ours!r}, but this model has "
                                     f"{field}={theirs!r}; create the cache from the model's config")
        if self.is_allocated and self.positions.shape[0] != batch:
            raise ValueError(f"BMojoCache: holds {self.positions.shape[0]} rows, but the input has {batch}")

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more tokens in every ring and KV cache (host-side bookkeeping only)."""
        total = self.seen_tokens + tokens
        for state in self.layer_states:
            for ring in state.rings():
                ring.reserve(total)
            if state.kv is not None:
                state.kv.reserve(total)

    def advance(self, tokens: int, positions: torch.Tensor | None = None) -> None:
        """Record ``tokens`` more tokens consumed; row positions move with them unless given. In place:
        the tensors keep their addresses (what a compiled step with CUDA graphs replays)."""
        self.seen_tokens += tokens
        self.kv_slot.fill_(self.seen_tokens)
        if positions is None:
            self.positions.add_(tokens)
        else:
            self.positions.copy_(positions)

    # -- transformers' Cache API --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.config.layer_types)

    @property
    def layers(self):  # transformers iterates cache.layers
        return self.layer_states or []

    @layers.setter
    def layers(self, value):
        if value:
            raise AttributeError("BMojoCache builds its own layer states")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [t != "attention" for t in self.config.layer_types]

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.config.layer_types)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.config.layer_types)

    def reset(self) -> None:
        self.seen_tokens = 0
        self.positions = self.prompt = self.layer_states = self.uniform_offset = None

    def _map_rows(self, fn) -> None:
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.prompt is not None:
            self.prompt = tuple(fn(x) for x in self.prompt)
        for state in self.layer_states or []:
            state.map_rows(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows reordered in place (beam search keeps the batch size; addresses stay for CUDA graphs)."""
        self._map_rows(lambda x: x.copy_(x.index_select(0, beam_idx.to(x.device))))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda x: x[indices])

    def crop(self, max_length: int) -> None:
        raise RuntimeError(
            "BMojoCache cannot be cropped: recurrent (SSM) and ring-buffer states cannot be rewound; "
            "re-run the prompt instead (assisted decoding / contrastive search are not supported)."
        )

    def state_nbytes(self) -> list[int]:
        """Bytes held by each layer's state (constant in T for every type but ``attention``)."""
        return [state.nbytes() for state in self.layer_states or []]

    def __repr__(self) -> str:
        return f"BMojoCache(seen_tokens={self.seen_tokens}, layers={list(self.config.layer_types)})"
