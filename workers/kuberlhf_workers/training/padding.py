"""How a training micro-batch is laid out for the forward pass: padded, packed, varlen or bucketed.

A rollout batch is collated once into the rectangle every loss reads (`batch.Batch`: prompts
left-padded to the step's longest, responses right-padded to its longest). Fed to the model as
is, every row costs the step's longest prompt plus its longest response, and logits are computed
for every column. The layouts here only change how the rows go through the model; their outputs
at the positions that predict response tokens are scattered back into the same [B, T] response
grid, so every loss, mask and metric downstream is untouched, and the gradient is the pad
layout's (up to float rounding):

- `pad`: the rectangle as collated (left-padded prompts, an attention mask);
- `bucket`: rows sorted by length and cut into groups of `bucket_rows`, each right-padded to its
  own longest sequence (prompt and response back to back). Pads come after every real token, so
  plain causal attention never lets a token see one: no mask at all, SDPA's fused causal kernel;
- `pack`: sequences back to back in rows no longer than the micro-batch's longest sequence
  (first-fit decreasing), position ids restarting at 0 per sequence; transformers turns restarting
  position ids into a block-diagonal causal mask, so nothing attends across a boundary;
- `varlen`: every sequence in one row, for flash-attention's variable-length kernel (transformers
  derives its cumulative sequence lengths from the position ids): no pad token at all. Without
  flash-attention the same row gets one dense block-diagonal mask, quadratic in all its tokens.

bench/packing.py measures them: on CPU pack is the fastest at 11M and 135M parameters.

A causal LM computes its logits only at the positions read (`logits_to_keep`): no [rows, prompt,
vocab] fp32 tensor (and gradient) for the prompt columns.

A multi-turn episode's observation tokens stay in the sequence (they are attended to) and their
grid entries are computed like any other; the response mask, which every layout leaves as it is,
keeps them out of the losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import Literal

import torch

from kuberlhf.api import Padding
from kuberlhf_workers.base.attention import cpu_attention
from kuberlhf_workers.training.batch import Batch
from kuberlhf_workers.training.packing import bins

Layout = Literal["pad", "bucket", "pack", "varlen"]
# Rows per bucket under spec padding bucket (bench/packing.py: 8 ahead of 4 and 16 at 11M).
BUCKET_ROWS = 8
# The token behind the padding of the new layouts: it always follows its row's real tokens, which
# causal attention keeps from seeing it, so any id will do.
FILL = 0


@dataclass(frozen=True)
class Piece:
    """One forward pass of a layout and where its outputs go in the response grid."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor | None  # [R, L], or None: causal (bucket) / from position ids (pack)
    keep: torch.Tensor  # [K] the columns whose outputs are read (ascending)
    src: torch.Tensor  # [N] flat index into the [R, K] outputs
    dst: torch.Tensor  # [N] flat index into the [B, T] response grid


@dataclass(frozen=True)
class Row:
    """One sequence of the batch without its padding: where its response sits in the grid."""

    index: int
    ids: torch.Tensor  # prompt then response (observations included), no pad
    prompt: int  # prompt tokens
    response: int  # response tokens


def resolve(padding: Padding, device: torch.device, dtype: torch.dtype) -> Layout:
    """The layout spec.<role>.padding asks for on this node. auto: varlen where flash-attention can
    run it (a CUDA device, the flash_attn package, a 16-bit compute dtype), else packed rows, the
    fastest on CPU at both sizes bench/packing.py measures (ahead of bucketed rows and of one
    varlen-style row under SDPA's dense block-diagonal mask). Packed rows in bf16 give the padded
    layout's log-probs and gradients up to bf16's own rounding (tests/workers/training/test_padding.py);
    a bf16 LoRA run once went flat with them, which repeated runs with each layout did not show."""
    sixteen_bits = dtype in (torch.bfloat16, torch.float16)
    flash = device.type == "cuda" and sixteen_bits and find_spec("flash_attn") is not None
    if padding == "auto":
        return "varlen" if flash else "pack"
    if padding == "pack":
        return "varlen" if flash else "pack"
    return padding


def attention_implementation(layout: Layout) -> str | None:
    """The attention kernel a model needs for `layout` (None: whatever it loaded with)."""
    return "flash_attention_2" if layout == "varlen" else None


def training_attention(layout: Layout, device: torch.device, longest: int) -> str | None:
    """The kernel a model trained on `device` loads with, for sequences of at most `longest` tokens:
    the layout's, else `base.attention.cpu_attention`'s. Forward-only models keep
    `attention_implementation`'s."""
    return attention_implementation(layout) or cpu_attention(device, longest)


def sequences(batch: Batch) -> list[Row]:
    """Each row's real tokens, read off the collated rectangle's attention mask."""
    prompt_cols = batch.prompt_len
    rows = []
    for i in range(len(batch)):
        real = batch.attention_mask[i].bool()
        prompt = int(real[:prompt_cols].sum())
        rows.append(Row(i, batch.input_ids[i][real], prompt, int(real[prompt_cols:].sum())))
    return rows


def _grid_index(row: Row, width: int) -> torch.Tensor:
    return row.index * width + torch.arange(row.response)


def _piece(
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    reads: list[tuple[int, torch.Tensor]],
    grid: list[torch.Tensor],
) -> Piece:
    """`reads`: per placed sequence, its piece row and the columns predicting its response tokens;
    `grid`: the matching grid indices."""
    cols = torch.cat([c for _, c in reads])
    keep = torch.unique(cols)  # sorted
    rows = torch.cat([torch.full_like(c, r) for r, c in reads])
    src = rows * len(keep) + torch.searchsorted(keep, cols)
    return Piece(ids, positions, mask, keep, src, torch.cat(grid))


def _predictors(row: Row, start: int) -> torch.Tensor:
    """Columns whose outputs predict the row's response tokens, the row placed at column `start`
    (response token t is predicted at the token before it). A response without a prompt token
    before it has no predictor for its first token: its grid entry stays 0."""
    first = start + row.prompt - 1 + torch.arange(row.response)
    return first[first >= start]


def _reads(row: Row, start: int, piece_row: int, width: int) -> tuple[tuple[int, torch.Tensor], torch.Tensor]:
    cols = _predictors(row, start)
    grid = _grid_index(row, width)[row.response - len(cols) :]
    return (piece_row, cols), grid


def pad_pieces(batch: Batch) -> list[Piece]:
    """The collated rectangle itself: response token t of every row is predicted at column P + t - 1."""
    rows, width = len(batch), batch.response_mask.shape[1]
    cols = torch.arange(batch.prompt_len - 1, batch.prompt_len - 1 + width)
    keep = cols[cols >= 0]
    src = (torch.arange(rows).unsqueeze(1) * len(keep) + torch.arange(len(keep))).flatten()
    dst = (torch.arange(rows).unsqueeze(1) * width + torch.arange(width - len(keep), width)).flatten()
    return [Piece(batch.input_ids, batch.position_ids, batch.attention_mask, keep, src, dst)]


def bucket_pieces(batch: Batch, bucket_rows: int = BUCKET_ROWS) -> list[Piece]:
    """Rows sorted by length, `bucket_rows` at a time, each right-padded to its bucket's longest."""
    width = batch.response_mask.shape[1]
    ordered = sorted(sequences(batch), key=lambda r: (len(r.ids), r.index))
    pieces = []
    for first in range(0, len(ordered), bucket_rows):
        group = ordered[first : first + bucket_rows]
        longest = max(1, max(len(r.ids) for r in group))
        ids = torch.full((len(group), longest), FILL, dtype=torch.long)
        reads, grid = [], []
        for k, row in enumerate(group):
            ids[k, : len(row.ids)] = row.ids
            read, dst = _reads(row, 0, k, width)
            reads.append(read)
            grid.append(dst)
        positions = torch.arange(longest).expand(len(group), longest)
        pieces.append(_piece(ids, positions, None, reads, grid))
    return pieces


def pack_pieces(batch: Batch, capacity: int | None = None) -> list[Piece]:
    """Sequences back to back, rows of at most `capacity` tokens (default: the longest sequence, so
    no row is longer than the padded one). Position ids restart at 0 for every sequence, which
    transformers reads as sequence boundaries. The padding at a row's end continues its last
    sequence's positions: it comes after every real token, so causal attention already keeps it
    out, and a batch in which no row holds two sequences then needs no mask at all (SDPA's
    causal kernel, as in the bucket layout)."""
    width = batch.response_mask.shape[1]
    rows = sequences(batch)
    lengths = [len(r.ids) for r in rows]
    groups = bins(lengths, capacity or max(1, max(lengths)))
    longest = max(1, max(sum(lengths[i] for i in g) for g in groups))
    ids = torch.full((len(groups), longest), FILL, dtype=torch.long)
    positions = torch.zeros((len(groups), longest), dtype=torch.long)
    reads, grid = [], []
    for k, group in enumerate(groups):
        at = start = 0
        for i in sorted(group):
            row, start = rows[i], at
            ids[k, at : at + len(row.ids)] = row.ids
            positions[k, at : at + len(row.ids)] = torch.arange(len(row.ids))
            read, dst = _reads(row, at, k, width)
            reads.append(read)
            grid.append(dst)
            at += len(row.ids)
        positions[k, at:] = torch.arange(at - start, longest - start)  # the last sequence's, continued
    return [_piece(ids, positions, None, reads, grid)]


def pieces(batch: Batch, layout: Layout, bucket_rows: int = BUCKET_ROWS) -> list[Piece]:
    if layout == "pad":
        return pad_pieces(batch)
    if layout == "bucket":
        return bucket_pieces(batch, bucket_rows)
    if layout == "pack":
        return pack_pieces(batch)
    return pack_pieces(batch, capacity=sum(len(r.ids) for r in sequences(batch)))  # varlen: one row


def response_outputs(
    model: torch.nn.Module, batch: Batch, layout: Layout, *, causal_lm: bool = True,
    bucket_rows: int = BUCKET_ROWS,
) -> torch.Tensor:
    """The model's outputs at the positions that predicted each response token: [B, T, V] logits of a
    causal LM (computed only there), [B, T, 1] for a value head (`causal_lm` False: it computes every
    position). Grid entries of padding are 0; the response mask keeps them out of every loss."""
    device = next(iter(model.parameters())).device
    width = batch.response_mask.shape[1]
    parts, dst = [], []
    for piece in pieces(batch, layout, bucket_rows):
        kwargs = {"logits_to_keep": piece.keep.to(device)} if causal_lm else {}
        out = model(
            input_ids=piece.input_ids.to(device),
            attention_mask=None if piece.attention_mask is None else piece.attention_mask.to(device),
            position_ids=piece.position_ids.to(device),
            use_cache=False,
            **kwargs,
        ).logits
        if not causal_lm:
            out = out[:, piece.keep.to(device)]
        if layout == "pad" and out.shape[1] == width:  # the kept columns are the grid already
            return out
        parts.append(out.reshape(-1, out.shape[-1])[piece.src.to(device)])
        dst.append(piece.dst)
    flat = torch.cat(parts)
    grid = flat.new_zeros((len(batch) * width, flat.shape[-1]))
    grid = grid.index_copy(0, torch.cat(dst).to(device), flat)
    return grid.view(len(batch), width, -1)
