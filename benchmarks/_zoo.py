"""The benchmark models: library models with random weights from small configs, and the hazard models.

Every builder returns a :class:`Spec`: an FP32 model in train mode (dropout off, so that every
variant and the FP64 reference see the same network), a tuning sample, held-out samples (never
the tuning one) and training samples. A *sample* is ``(batch, loss_fn)``; ``loss_fn`` is None where
the model returns its own loss (the transformers models, the underflow model). Nothing is
downloaded: the transformers models are built from configs, the graphs are random.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the hazard models live in tests/models.py
    sys.path.insert(0, _ROOT)

Sample = tuple[Any, Optional[Callable[[Any, Any], torch.Tensor]]]


@dataclass
class Spec:
    name: str
    group: str
    model: nn.Module
    tune: Sample
    heldout: list[Sample]
    train: list[Sample]
    optimizer: Callable[[Any], torch.optim.Optimizer] = field(
        default=lambda params: torch.optim.Adam(params, lr=1e-3))
    note: str = ""


class _seeded:
    """Fork the CPU RNG and seed it, so that building a model never disturbs the caller's RNG."""

    def __init__(self, seed: int) -> None:
        self.seed, self._ctx = seed, None

    def __enter__(self) -> _seeded:
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# transformers (random weights from small configs)
# ---------------------------------------------------------------------------------------------

def _lm_samples(n: int, vocab: int, batch: int, seq: int, seed: int, *, seq2seq: bool = False) -> list[Sample]:
    out = []
    with _seeded(seed):
        for _ in range(n):
            ids = torch.randint(0, vocab, (batch, seq))
            b = {"input_ids": ids, "labels": torch.randint(0, vocab, (batch, seq)) if seq2seq else ids.clone()}
            out.append((b, None))
    return out


def _image_samples(n: int, batch: int, px: int, labels: int, seed: int) -> list[Sample]:
    out = []
    with _seeded(seed):
        for _ in range(n):
            out.append(({"pixel_values": torch.randn(batch, 3, px, px),
                         "labels": torch.randint(0, labels, (batch,))}, None))
    return out


def _split(samples: list[Sample], heldout: int) -> tuple[Sample, list[Sample], list[Sample]]:
    return samples[0], samples[1:1 + heldout], samples[1 + heldout:]


def _hf(name: str, size: str, heldout: int, train: int) -> Spec:
    import transformers as tf

    small, large = size == "quick", size == "large"
    d = 32 if small else 256 if large else 64
    layers = 1 if small else 4 if large else 2
    vocab = 128 if small else 1024 if large else 256
    batch, seq = (2, 16) if small else (8, 128) if large else (4, 32)
    px = 32 if small else 64
    widths = [64, 128, 256, 512] if large else [16, 32, 64, 128]
    n = 1 + heldout + train
    with _seeded(0):
        if name == "gpt2":
            model = tf.GPT2LMHeadModel(tf.GPT2Config(
                n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab, n_positions=seq,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
            samples = _lm_samples(n, vocab, batch, seq, 1)
        elif name == "bert":
            model = tf.BertForMaskedLM(tf.BertConfig(
                hidden_size=d, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * d,
                vocab_size=vocab, max_position_embeddings=seq, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0))
            samples = _lm_samples(n, vocab, batch, seq, 2)
        elif name == "t5":
            model = tf.T5ForConditionalGeneration(tf.T5Config(
                d_model=d, d_ff=2 * d, d_kv=d // 4, num_layers=layers, num_decoder_layers=layers, num_heads=4,
                vocab_size=vocab, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
            samples = _lm_samples(n, vocab, batch, seq, 3, seq2seq=True)
        elif name == "llama":
            model = tf.LlamaForCausalLM(tf.LlamaConfig(
                hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq))
            samples = _lm_samples(n, vocab, batch, seq, 4)
        elif name == "resnet":
            model = tf.ResNetForImageClassification(tf.ResNetConfig(
                embedding_size=widths[0], hidden_sizes=widths, depths=[1, 1, 1, 1], num_labels=10))
            samples = _image_samples(n, batch, px, 10, 5)
        elif name == "convnext":
            model = tf.ConvNextForImageClassification(tf.ConvNextConfig(
                hidden_sizes=widths, depths=[1, 1, 1, 1], num_labels=10))
            samples = _image_samples(n, batch, px, 10, 6)
        elif name == "vit":
            model = tf.ViTForImageClassification(tf.ViTConfig(
                image_size=px if large else 32, patch_size=8 if small else 4, hidden_size=d, num_hidden_layers=layers,
                num_attention_heads=4, intermediate_size=4 * d, num_labels=10, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0))
            samples = _image_samples(n, batch, px if large else 32, 10, 7)
        else:  # pragma: no cover
            raise KeyError(name)
    group = "vision" if name in ("resnet", "convnext", "vit") else "transformers"
    t, h, tr = _split(samples, heldout)
    return Spec(name, group, model.float().train(), t, h, tr)


# ---------------------------------------------------------------------------------------------
# torch_geometric on graphs with high-degree (hub) nodes
# ---------------------------------------------------------------------------------------------

def _hub_graph(nodes: int, feats: int, classes: int, hubs: int, fan_in: int, edges: int, seed: int) -> Sample:
    """A random graph where ``hubs`` nodes each receive ``fan_in`` edges; non-negative features."""
    with _seeded(seed):
        x = torch.rand(nodes, feats) * 40.0
        hub_dst = torch.arange(hubs).repeat_interleave(fan_in)
        hub_src = torch.randint(hubs, nodes, (hubs * fan_in,))
        rnd_src = torch.randint(0, nodes, (edges,))
        rnd_dst = torch.randint(hubs, nodes, (edges,))
        ei = torch.stack([torch.cat([hub_src, rnd_src]), torch.cat([hub_dst, rnd_dst])])
        ei = ei[:, torch.randperm(ei.shape[1])].contiguous()
        y = torch.randint(0, classes, (nodes,))

    def loss_fn(out: torch.Tensor, batch: Any, y: torch.Tensor = y) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    return (x, ei), loss_fn


def _pyg(name: str, size: str, heldout: int, train: int) -> Spec:
    from torch_geometric.nn import models as M

    small = size == "quick"
    nodes, fan_in, edges = (300, 2500, 1200) if small else (600, 4000, 3000)
    feats, hidden, classes = 16, 32 if small else 64, 8
    with _seeded(0):
        if name == "gcn":
            model = M.GCN(feats, hidden, 2, classes)
        elif name == "sage":
            model = M.GraphSAGE(feats, hidden, 2, classes, aggr="sum")
        elif name == "gat":
            model = M.GAT(feats, hidden, 2, classes, heads=2)
        else:  # pragma: no cover
            raise KeyError(name)
    samples = [_hub_graph(nodes, feats, classes, 4, fan_in, edges, 100 + i) for i in range(1 + heldout + train)]
    t, h, tr = _split(samples, heldout)
    note = {"gcn": "GCN (sym. norm)", "sage": "GraphSAGE, sum aggregation", "gat": "GAT, 2 heads"}[name]
    return Spec(name, "gnn", model.train(), t, h, tr, note=f"{note}; 4 hubs with fan-in {fan_in}")


# ---------------------------------------------------------------------------------------------
# the hazard models of tests/models.py: weights of seed 0, data of other seeds for held-out/train
# ---------------------------------------------------------------------------------------------

def _mse_to(target: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.mse_loss(out.float(), target)

    return loss_fn


def _hazard(name: str, size: str, heldout: int, train: int) -> Spec:
    from tests import models as TM

    factory = TM.FACTORIES[name]
    model, batch, loss_fn = factory(seed=0)
    samples: list[Sample] = [(batch, loss_fn)]
    for s in range(1, 1 + heldout + train):
        _, b, lf = factory(seed=s)
        if name == "rotary_model":
            # the target is "the model's own output plus noise" (a model near convergence): rebuild it
            # from *this* model, or a held-out target would come from other weights
            with _seeded(1000 + s), torch.no_grad():
                ref = model(**b)
                target = ref + ref.std() * torch.randn_like(ref)
            lf = _mse_to(target)
        samples.append((b, lf))
    opt = TM.underflow_optimizer if name == "underflow_model" else (lambda p: torch.optim.Adam(p, lr=1e-3))
    t, h, tr = _split(samples, heldout)
    return Spec(name, "hazards", model.train(), t, h, tr, optimizer=opt)


HF_MODELS = ("gpt2", "bert", "t5", "llama", "resnet", "convnext", "vit")
GNN_MODELS = ("gcn", "sage", "gat")
HAZARD_MODELS = ("scatter_gnn", "rmsnorm_model", "unscaled_attention", "rotary_model", "underflow_model")
ALL_MODELS = HF_MODELS + GNN_MODELS + HAZARD_MODELS
GROUPS = {
    "transformers": ("gpt2", "bert", "t5", "llama"),
    "vision": ("resnet", "convnext", "vit"),
    "gnn": GNN_MODELS,
    "hazards": HAZARD_MODELS,
    "all": ALL_MODELS,
}


def build(name: str, size: str = "default", heldout: int = 2, train: int = 4) -> Spec:
    """Build one benchmark model by name (see ``ALL_MODELS``).

    ``size``: ``"default"``, ``"quick"`` (smaller), or ``"large"`` (transformers models only: width 256,
    4 layers, 8 x 128 tokens or 64-px images; for CPU speed, where BF16 pays off).
    """
    if name in HF_MODELS:
        return _hf(name, size, heldout, train)
    if name in GNN_MODELS:
        return _pyg(name, size, heldout, train)
    if name in HAZARD_MODELS:
        return _hazard(name, size, heldout, train)
    raise KeyError(f"unknown model {name!r}; known: {', '.join(ALL_MODELS)} or groups {', '.join(GROUPS)}")


def expand(names: list[str]) -> list[str]:
    """Model names and group names -> model names, in order, without repeats."""
    out: list[str] = []
    for n in names:
        for m in GROUPS.get(n, (n,)):
            if m not in ALL_MODELS:
                raise SystemExit(f"unknown model {m!r}; known: {', '.join(ALL_MODELS)}; groups: {', '.join(GROUPS)}")
            if m not in out:
                out.append(m)
    return out
