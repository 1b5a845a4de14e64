"""The LEMUR-style multimodal recommender (arXiv 2511.10962), our own small configurable definition.

There is no public LEMUR code; this file is the reference the engines are tested against. Two
programs, one stage each:

- `embed` (document tower): token ids of the title/OCR/ASR segments go through a text transformer,
  a few video frames through a patch encoder; both summaries are fused into one L2-normalised
  document embedding. Token id 0 is padding; frames are [F, 3, image_size, image_size].
- `score` (user tower + CTR head): the query text is encoded by its own small transformer; it
  attends over the user's history of document embeddings (taken from the memory bank; padded slots
  have mask 0); the CTR head maps [query, user, query*user] to a click probability.

Every tower starts with a learned summary token, so attention always has at least one valid key
(an all-padding text or an empty history still gives a finite result).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

SEGMENTS = ("title", "ocr", "asr")  # segment ids 0, 1, 2 of the document text


@dataclasses.dataclass(frozen=True)
class LemurConfig:
    vocab_size: int = 1000
    max_text_len: int = 256  # per document, all segments together (position table size)
    max_query_len: int = 64
    text_dim: int = 64
    text_layers: int = 2
    image_size: int = 32
    patch_size: int = 8
    max_frames: int = 8
    image_dim: int = 64
    image_layers: int = 1
    num_heads: int = 4
    embed_dim: int = 64  # the document embedding stored in the memory bank
    user_dim: int = 64
    query_layers: int = 1
    ctr_hidden: int = 128

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LemurConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("text_dim", "image_dim", "user_dim"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of num_heads {self.num_heads}")

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LemurConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LEMUR config keys: {', '.join(unknown)}")
        return cls(**data)


class Block(nn.Module):
    """Pre-norm transformer layer; `mask` [B, T] bool is True where a key may be attended to."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The mask spelled out as [B, 1, T, T]: ONNX Runtime's Attention op does not broadcast the query axis.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].expand(b, 1, t, t))
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TextTower(nn.Module):
    """Token ids (+ segment ids) -> the summary token's output."""

    def __init__(self, vocab: int, max_len: int, dim: int, layers: int, heads: int, segments: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(1, max_len + 1, dim))
        self.segments = nn.Embedding(segments, dim) if segments else None
        self.summary = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t = ids.shape
        x = self.tokens(ids)
        if self.segments is not None:
            x = x + self.segments(segment_ids)
        x = torch.cat([self.summary.expand(b, -1, -1), x], dim=1) + self.positions[:, : t + 1]
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=ids.device), ids != 0], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x[:, 0])


class ImageTower(nn.Module):
    """Frames [B, F, 3, S, S] -> patches of every frame (+ frame position) -> the summary token's output."""

    def __init__(self, c: LemurConfig):
        super().__init__()
        self.patch = nn.Conv2d(3, c.image_dim, c.patch_size, stride=c.patch_size)
        self.patch_positions = nn.Parameter(torch.zeros(1, 1, c.patches_per_frame, c.image_dim))
        self.frame_positions = nn.Parameter(torch.zeros(1, c.max_frames, 1, c.image_dim))
        self.summary = nn.Parameter(torch.zeros(1, 1, c.image_dim))
        self.blocks = nn.ModuleList(Block(c.image_dim, c.num_heads) for _ in range(c.image_layers))
        self.norm = nn.LayerNorm(c.image_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, f, ch, h, w = frames.shape
        x = self.patch(frames.reshape(b * f, ch, h, w))  # [B*F, D, h', w']
        x = x.flatten(2).transpose(1, 2).reshape(b, f, -1, x.shape[1])
        x = (x + self.patch_positions + self.frame_positions[:, :f]).reshape(b, -1, x.shape[-1])
        x = torch.cat([self.summary.expand(b, -1, -1), x], dim=1)
        mask = torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x[:, 0])


class DocumentTower(nn.Module):
    """text + frames -> L2-normalised document embedding [B, embed_dim]."""

    def __init__(self, c: LemurConfig):
        super().__init__()
        self.text = TextTower(c.vocab_size, c.max_text_len, c.text_dim, c.text_layers, c.num_heads, len(SEGMENTS))
        self.image = ImageTower(c)
        self.fusion = nn.Sequential(nn.Linear(c.text_dim + c.image_dim, 2 * c.embed_dim), nn.GELU(),
                                    nn.Linear(2 * c.embed_dim, c.embed_dim))

    def forward(self, text_ids, segment_ids, frames):
        fused = self.fusion(torch.cat([self.text(text_ids, segment_ids), self.image(frames)], dim=-1))
        return F.normalize(fused, dim=-1, eps=1e-12)


class UserTower(nn.Module):
    """Query text + history embeddings -> (query vector, user vector): the query attends over the history."""

    def __init__(self, c: LemurConfig):
        super().__init__()
        self.heads = c.num_heads
        self.query = TextTower(c.vocab_size, c.max_query_len, c.user_dim, c.query_layers, c.num_heads, 0)
        self.history = nn.Linear(c.embed_dim, c.user_dim)
        self.empty = nn.Parameter(torch.zeros(1, 1, c.user_dim))  # the key an empty history attends to
        self.q = nn.Linear(c.user_dim, c.user_dim)
        self.kv = nn.Linear(c.user_dim, 2 * c.user_dim)
        self.out = nn.Linear(c.user_dim, c.user_dim)
        self.norm = nn.LayerNorm(c.user_dim)

    def forward(self, history, history_mask, query_ids):
        b, _, _ = history.shape
        d = self.empty.shape[-1]
        query = self.query(query_ids)  # [B, D]
        keys = torch.cat([self.empty.expand(b, -1, -1), self.history(history)], dim=1)  # [B, 1+H, D]
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=history.device), history_mask > 0.5], dim=1)
        q = self.q(query).reshape(b, 1, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(keys).reshape(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        user = self.norm(query + self.out(attn.transpose(1, 2).reshape(b, d)))
        return query, user


class LemurModel(nn.Module):
    def __init__(self, config: LemurConfig):
        super().__init__()
        self.config = config
        self.document = DocumentTower(config)
        self.user = UserTower(config)
        d = config.user_dim
        self.ctr = nn.Sequential(nn.Linear(3 * d, config.ctr_hidden), nn.GELU(), nn.Linear(config.ctr_hidden, 1))

    def embed(self, text_ids: torch.Tensor, segment_ids: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Document embeddings [B, embed_dim] (unit L2 norm)."""
        return self.document(text_ids, segment_ids, frames)

    def score(self, history: torch.Tensor, history_mask: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        """Click probability [B] of each query given the user's history embeddings [B, H, embed_dim]."""
        query, user = self.user(history, history_mask, query_ids)
        return torch.sigmoid(self.ctr(torch.cat([query, user, query * user], dim=-1))[:, 0])
