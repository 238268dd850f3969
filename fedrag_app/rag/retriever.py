"""The retriever: a dual encoder of two sentence-transformers models, trainable through plain torch.

The query encoder trains (LSR); the context encoder embeds passages into the store and stays frozen by
default (RA-DIT), so a trained query encoder never makes the index stale. Both start from the same weights
unless ``retriever.context-model`` names another model; they are separate copies either way.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from fedrag_app.config.app_config import RetrieverConfig
from fedrag_app.core.atomic import atomic_dir
from fedrag_app.core.errors import ConfigError, WeightsError
from fedrag_app.rag.model_sources import resolve_retriever
from fedrag_app.rag.prompts import format_passage

_LAYER = re.compile(r"\.layer\.(\d+)\.")


class DualEncoder:
    """Query encoder (trainable) + context encoder (frozen unless configured); cosine scores."""

    def __init__(
        self,
        query_model: SentenceTransformer,
        context_model: SentenceTransformer,
        *,
        name: str,
        train_top_layers: int = 0,
        train_context: bool = False,
    ):
        self.query_model = query_model
        self.context_model = context_model
        self.name = name  # identifies the context encoder; recorded in every shard
        self.dim = _dimension(query_model)
        context_dim = _dimension(context_model)
        if context_dim != self.dim:
            raise ConfigError(f"query encoder is {self.dim}-d but context encoder '{name}' is {context_dim}-d")
        self.train_context = train_context
        self._query_trainable = _select_trainable(query_model, train_top_layers)
        self._context_trainable = _select_trainable(context_model, 0) if train_context else {}
        self._context_fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return self.query_model.device

    def encode_queries(self, texts: list[str], *, grad: bool = False) -> torch.Tensor:
        """(B, D) L2-normalised; with ``grad`` the graph reaches the query encoder's weights (LSR needs it)."""
        return _encode(self.query_model, texts, grad=grad)

    def encode_passages(self, texts: list[str], *, batch_size: int = 64, grad: bool = False):
        """(N, D) float32 numpy (for the store), or a Tensor with graph when ``grad`` (context-encoder training)."""
        if grad:
            return _encode(self.context_model, texts, grad=True)
        return _encode_by_token_length(self.context_model, list(texts), batch_size)

    def context_fingerprint(self) -> str:
        """context_encoder_fingerprint(self): what a shard records and the embedding cache is keyed by. Cached while
        the context encoder is frozen; recomputed when it trains."""
        if self._context_fingerprint is not None and not self.train_context:
            return self._context_fingerprint
        fingerprint = context_encoder_fingerprint(self)
        if not self.train_context:
            self._context_fingerprint = fingerprint
        return fingerprint

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._query_trainable.values()) + list(self._context_trainable.values())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What trains and travels: 'query.<param>' (+ 'context.<param>'), fp32 CPU copies, sorted."""
        out = {f"query.{k}": p for k, p in self._query_trainable.items()}
        out.update({f"context.{k}": p for k, p in self._context_trainable.items()})
        return {k: out[k].detach().to("cpu", torch.float32).clone() for k in sorted(out)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        current = {f"query.{k}": p for k, p in self._query_trainable.items()}
        current.update({f"context.{k}": p for k, p in self._context_trainable.items()})
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        if missing or unexpected:
            raise WeightsError(f"retriever weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                param = current[key]
                if tuple(value.shape) != tuple(param.shape):
                    raise WeightsError(
                        f"retriever weight '{key}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(value.to(param.device, param.dtype))

    def save(self, out_dir: str | Path) -> None:
        """<out>/query and <out>/context as sentence-transformers folders, plus dual_encoder.json; atomic."""
        with atomic_dir(out_dir) as tmp:
            self.query_model.save(str(tmp / "query"))
            self.context_model.save(str(tmp / "context"))
            (tmp / "dual_encoder.json").write_text(json.dumps({"name": self.name, "dim": self.dim}, indent=2))


def context_encoder_fingerprint(encoder) -> str:
    """sha256 (64 hex digits) over what decides a passage's vector: the context encoder's weights (every state_dict
    tensor's bytes), its module pipeline (max length, pooling, normalisation: the model's repr), our always-on L2
    normalisation and the passage template. The one fingerprint of a context encoder: a shard records it (its
    vectors' encoder, checked when opened and by a node answering query vectors) and the embedding cache is keyed
    by it, so a trained context encoder never reads another encoder's vectors. ``encoder``: a DualEncoder, or
    anything with its ``name``, ``dim`` and ``context_model``."""
    model = encoder.context_model
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "name": encoder.name,
                "dim": int(encoder.dim),
                "max_seq_length": getattr(model, "max_seq_length", None),
                "normalize": True,
                "modules": repr(model),
                "template": format_passage("T", "X"),
            }
        ).encode()
    )
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dimension(model: SentenceTransformer) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def _encode(model: SentenceTransformer, texts: list[str], *, grad: bool) -> torch.Tensor:
    prep = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6 renamed it
    features = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in prep(list(texts)).items()}
    with torch.set_grad_enabled(grad):
        emb = model(features)["sentence_embedding"]  # (B, D)
        return F.normalize(emb, dim=-1)


def _encode_by_token_length(model: SentenceTransformer, texts: list[str], batch_size: int) -> np.ndarray:
    """(N, D) float32, L2-normalised, in input order. sentence-transformers batches a call's inputs sorted by
    characters, which on this corpus pads 23% more tokens at batch 16 and 37% at 64; batches sorted by token
    length pad 0.2-0.8%, and a batch of one length runs SDPA without a mask (docs/PERFORMANCE.md)."""
    out = np.empty((len(texts), _dimension(model)), dtype=np.float32)
    if not texts:
        return out
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        out[rows] = model.encode(
            [texts[i] for i in rows], batch_size=len(rows), convert_to_numpy=True, normalize_embeddings=True
        )
    return out


def _select_trainable(model: SentenceTransformer, top_layers: int) -> dict[str, torch.nn.Parameter]:
    """All parameters, or only those of the top N transformer layers; the rest are frozen."""
    named = dict(model.named_parameters())
    if top_layers:
        depths = {int(m.group(1)) for n in named if (m := _LAYER.search(n))}
        if not depths:
            raise ConfigError("retriever.train-top-layers > 0, but the model has no '.layer.<i>.' parameters")
        keep = set(sorted(depths)[-top_layers:])
        chosen = {n: p for n, p in named.items() if (m := _LAYER.search(n)) and int(m.group(1)) in keep}
    else:
        chosen = named
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    return chosen


def load_retriever(cfg: RetrieverConfig, *, device: str = "cpu", path: str | None = None) -> DualEncoder:
    """From the configured models, or from a folder written by ``DualEncoder.save`` (``path``)."""
    if path:
        meta_file = Path(path) / "dual_encoder.json"
        if not meta_file.exists():
            raise ConfigError(f"{path} is not a saved retriever (no dual_encoder.json)")
        meta = json.loads(meta_file.read_text())
        query_src, context_src, name = str(Path(path) / "query"), str(Path(path) / "context"), meta["name"]
    else:
        query_src = resolve_retriever(cfg.model)
        context_src = resolve_retriever(cfg.context_model or cfg.model)
        name = cfg.context_model or cfg.model
    query = SentenceTransformer(query_src, device=device)
    context = SentenceTransformer(context_src, device=device)
    context.eval()
    return DualEncoder(
        query, context, name=name, train_top_layers=cfg.train_top_layers, train_context=cfg.train_context_encoder
    )
