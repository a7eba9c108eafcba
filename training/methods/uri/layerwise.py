"""URI, layer by layer: the decoder is both the retriever and the indexer (Li et al., ICLR 2025).

One shared :class:`~models.nets.decoder.TokenDecoder` gives, at every index level, a distribution over
the ``k`` tokens of that level for a query (memory = the query encoder's states of the user's
history: by default a frozen copy of the split's SASRec, :mod:`training.methods.sasrec.query_encoder`; or a
:class:`~models.nets.encoder.QueryEncoder` trained from scratch) and for an item (memory = the item's id
and attribute embeddings). The index is built layer by layer (paper 4.2):

1. level ``l`` trains ``E-step + M-step`` (eqs. 8-10, :mod:`training.methods.uri.losses`) plus the memory
   loss of the levels already assigned (eq. 11), with the assigned tokens as the decoder prefix,
   until a convergence criterion holds (``URIConfig.level_*``);
2. every item is then assigned a level-``l`` token with the capacity-constrained assignment
   (capacity = items under the parent / k), and the level's APE and balance are logged;
3. after level L the items' codes are the leaves (buckets of items); a final stage trains the
   ranker (sampled softmax, 9 uniform + 1 sibling-leaf negative) with the memory loss of all L
   levels so that the decoder keeps the final index (the ranker loss also runs in the level stages).

A warm level (``warm_start``) replaces step 1's soft losses by hard EM from balanced k-means
tokens (:mod:`training.methods.uri.assign`).

:meth:`URIModel.level_logits` runs the decoder's layers over the whole prefix at once (all levels
in one pass); a test holds it to the decoder-step signature ``TokenDecoder.forward``.

Before the index exists the decoder runs on the *complete* k-ary tree of depth L (every token at
every level), whose node ids follow from the code prefix; the exported decoder is rebuilt on the
real index with the same weights (``token_scheme="level"``: a node's token is its code, so both
trees map a (level, token) to the same embedding row).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from models.index import TreeIndex
from training import distributed
from training.context import TrainContext
from training.methods.sasrec.cache import sasrec_for
from training.methods.uri.assign import QueryEvidence, kmeans_within_parents
from training.methods.uri.config import URIConfig
from training.methods.uri.index import SiblingSampler, assign_level, eval_queries, group_ids, level_report
from training.methods.uri.losses import (
    balance_loss,
    commitment_loss,
    e_step_loss,
    m_step_loss,
    memory_loss,
    sampled_softmax_loss,
)
from training.methods.uri.model import URIModel
from training.methods.uri.schedule import LevelConvergence, PairBatches
from training.splits import training_pairs
from training.trainer import progress, run_epochs, seeded, shard_rows, torch_threads

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Training


class _Step(nn.Module):
    """The training step as a module (DDP hooks ``forward``): ``(rows, level, sibling) -> (loss, terms)``."""

    def __init__(self, trainer: URITrainer) -> None:
        super().__init__()
        self.model = trainer.model
        self.trainer = [trainer]  # in a list: not a submodule

    def forward(
        self, rows: np.ndarray, level: int, sibling: SiblingSampler | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.trainer[0].terms(rows, level, sibling)


class URITrainer:
    """Runs the layer-by-layer schedule and the ranker stage on one split."""

    def __init__(self, config: URIConfig, ctx: TrainContext) -> None:
        self.config = config
        self.ctx = ctx
        ds = ctx.dataset
        self.num_items = ds.num_items
        self.dist = distributed.current()
        self.rng = seeded(ctx.seed, self.dist.rank).rng
        attributes = None
        if config.use_attributes and ds.item_attributes is not None and ds.num_attributes > 0:
            attributes = np.zeros((ds.num_items + 1, config.max_attributes), dtype=np.int64)  # [N+1, A]
            for item, attrs in enumerate(ds.item_attributes):
                attrs = attrs[: config.max_attributes]
                attributes[item, : len(attrs)] = attrs
        sasrec = sasrec_for(ctx).module if config.query_encoder == "sasrec" else None
        self.model = URIModel(
            config, ds.num_items, attributes, ds.num_attributes if attributes is not None else 0, sasrec
        )
        encoder_params = list(self.model.encoder.parameters())
        shared = {id(p) for p in encoder_params}
        rest = [p for p in self.model.parameters() if id(p) not in shared]
        self.optimizer = torch.optim.Adam(
            [{"params": rest, "lr": config.lr}, {"params": encoder_params, "lr": config.lr}],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.frozen_encoder = False
        self.set_encoder_lr_scale(config.encoder_lr_scale)
        self.detach = config.detach_targets  # per epoch: see detach_warmup_epochs
        histories, targets = training_pairs(ctx.split.train, config.max_len)
        if len(targets) == 0:
            raise ValueError("URI needs training sequences with at least two items")
        histories, targets = shard_rows(self.dist, histories, targets)
        # the same global batch as one process: each of W ranks steps on batch_size / W pairs
        batch_size = math.ceil(config.batch_size / self.dist.world_size)
        self.batches = PairBatches(histories, targets, batch_size, config.steps_per_epoch, self.rng)
        # [N+1, L] assigned tokens, -1 until a level is assigned
        self.codes = np.full((ds.num_items + 1, config.levels), -1, dtype=np.int64)
        self.queries = [s for s in ctx.split.train if len(s) > 1]  # APE queries: training users' items
        self.valid_queries = eval_queries(ctx.split.valid)  # logged beside them, never trained on
        self.evidence = QueryEvidence(ds.num_items, config.k)  # P_Q of each item's queries, this epoch
        self.hard_level = False  # the level being trained started from k-means (warm_start): hard EM
        self.log: list[dict[str, Any]] = []
        self._parents: tuple[int, np.ndarray, np.ndarray] | None = None  # level, items by parent, offsets

    # ---------------------------------------------------------------- one step
    def _random_items(self, level: int, count: int) -> np.ndarray:
        """``[count]`` random items for the commitment and balance terms.

        Level 1 (or ``balance_per_parent`` off): uniform over all items. Level >= 2: uniform
        within ``ceil(count / balance_parent_items)`` random parents, so that each parent present in
        the batch has about ``balance_parent_items`` items to estimate its children's balance from.
        """
        c = self.config
        if level == 1 or not c.balance_per_parent:
            return self.rng.integers(1, self.num_items + 1, size=count)
        if self._parents is None or self._parents[0] != level:
            groups = group_ids(self.codes[1:, : level - 1])  # [N] parent of every item
            order = np.argsort(groups, kind="stable")  # items (0-based) grouped by parent
            self._parents = (level, order, np.searchsorted(groups[order], np.arange(groups.max() + 2)))
        _, order, offsets = self._parents  # offsets [G+1]
        parents = self.rng.integers(
            0, len(offsets) - 1, size=max(1, math.ceil(count / c.balance_parent_items))
        )
        parent = parents[np.arange(count) % len(parents)]  # [count]
        size = offsets[parent + 1] - offsets[parent]
        return order[offsets[parent] + self.rng.integers(0, size)] + 1

    def _step(self, rows: np.ndarray, level: int, sibling: SiblingSampler | None) -> dict[str, float]:
        """One optimiser step on the pairs ``rows`` through ``self.net`` (DDP-wrapped under torchrun)."""
        loss, terms = self.net(rows, level, sibling)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        out = {name: float(t.detach()) for name, t in terms.items()}
        out["loss"] = float(loss.detach())
        return out

    def terms(
        self, rows: np.ndarray, level: int, sibling: SiblingSampler | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and its terms on the pairs ``rows``: the index terms of ``level`` (0 = ranker stage)."""
        hist = torch.as_tensor(self.batches.history(rows))  # [B, T_b]
        pos = self.batches.targets[rows]  # [B]
        q_memory, q_mask, query = self.model.encode_queries(hist)
        if level > 0 and not self.hard_level:
            terms = self._index_terms(q_memory, q_mask, pos, level)
        else:  # the ranker stage (all L levels) or a warm level (levels 1..level, tokens given)
            terms = self._memory_terms(q_memory, q_mask, pos, level or self.config.levels)
        if self.config.ranker_weight > 0:
            terms["ranker"] = self.config.ranker_weight * self._ranker_term(query, pos, sibling)
        return torch.stack(list(terms.values())).sum(), terms

    def _index_terms(
        self, q_memory: Tensor, q_mask: Tensor, pos_np: np.ndarray, level: int
    ) -> dict[str, Tensor]:
        """Eqs. 8-11 at ``level``: E-step, M-step, commitment, balance (+ memory of the levels above)."""
        c, model = self.config, self.model
        B = len(pos_np)
        pos = torch.as_tensor(pos_np)  # [B]
        rand = torch.as_tensor(self._random_items(level, B))  # [B]
        items = torch.cat([pos, rand])  # [2B] positives then random items
        i_memory, i_mask = model.encode_items(items)
        codes = torch.as_tensor(self.codes)
        q_logits = model.level_logits(q_memory, q_mask, codes[pos, : level - 1])  # level x [B, k]
        i_logits = model.level_logits(i_memory, i_mask, codes[items, : level - 1])  # level x [2B, k]
        q_cur, i_cur = q_logits[-1], i_logits[-1]
        self.evidence.add(pos_np, q_cur)
        terms = {
            "e_step": e_step_loss(q_cur, i_cur[:B], detach_target=self.detach),
            "m_step": m_step_loss(q_cur, i_cur[:B], detach_target=self.detach),
            "commit": (c.commit_weight if level == 1 else c.commit_weight_deeper) * commitment_loss(i_cur),
        }
        if level > 1 and c.balance_per_parent:  # per parent, over the parent-stratified random items
            groups = model.tree.prefix_nodes(codes[rand, : level - 1])[:, -1]  # [B]
            balance = balance_loss(i_cur[B:], adaptive=c.balance_adaptive, groups=groups)
        else:
            balance = balance_loss(i_cur, adaptive=c.balance_adaptive)
        terms["balance"] = (c.balance_weight if level == 1 else c.balance_weight_deeper) * balance
        if level > 1:
            terms["memory"] = c.memory_weight * memory_loss(
                q_logits[:-1], [x[:B] for x in i_logits[:-1]], codes[pos, : level - 1]
            )
        return terms

    def _memory_terms(
        self, q_memory: Tensor, q_mask: Tensor, pos_np: np.ndarray, depth: int
    ) -> dict[str, Tensor]:
        """Eq. 11 over levels ``1..depth``: the ranker stage (depth L, so that the decoder keeps the
        final index) or a warm level (its tokens given; the queries' P_Q there is the evidence)."""
        c, model = self.config, self.model
        pos = torch.as_tensor(pos_np)  # [B]
        codes = torch.as_tensor(self.codes)[pos, :depth]  # [B, depth]
        q_logits = model.level_logits(q_memory, q_mask, codes[:, : depth - 1])  # depth x [B, k]
        i_memory, i_mask = model.encode_items(pos)
        i_logits = model.level_logits(i_memory, i_mask, codes[:, : depth - 1])
        if self.hard_level:
            self.evidence.add(pos_np, q_logits[-1])
        return {"memory": c.memory_weight * memory_loss(q_logits, i_logits, codes)}

    def _ranker_term(self, query: Tensor, pos_np: np.ndarray, sibling: SiblingSampler | None) -> Tensor:
        """Sampled softmax of ``query [B, D]`` over the positive and ``num_negatives`` negatives:
        uniform ones, of which ``hard_negatives`` come from a sibling leaf once the index exists."""
        c = self.config
        B = len(pos_np)
        neg = self.rng.integers(1, self.num_items + 1, size=(B, c.num_negatives))  # [B, n]
        if sibling is not None:
            for j in range(c.hard_negatives):
                neg[:, j] = sibling.sample(pos_np)
        items = torch.as_tensor(np.concatenate([pos_np, neg.reshape(-1)]))  # [B + B*n]
        vectors = self.model.item_vectors(items)  # [B + B*n, D]
        return sampled_softmax_loss(query, vectors[:B], vectors[B:].reshape(B, c.num_negatives, -1))

    def set_encoder_lr_scale(self, scale: float) -> None:
        """The query encoder (param group 1) learns at ``lr * scale``; 0 freezes it (no gradients, no dropout)."""
        self.frozen_encoder = scale == 0
        self.optimizer.param_groups[1]["lr"] = self.config.lr * scale
        for param in self.model.encoder.parameters():
            param.requires_grad_(not self.frozen_encoder)
        # (re)wrapped after the change: DDP reduces the gradients of the parameters that train when it wraps
        self.net = self.dist.wrap(_Step(self), find_unused_parameters=True)

    def _epoch(self, level: int, desc: str, sibling: SiblingSampler | None = None) -> dict[str, float]:
        self.model.train()
        if self.frozen_encoder:
            self.model.encoder.eval()  # no dropout in a frozen encoder
        sums: dict[str, float] = {}
        chunks = self.batches.epoch()
        for rows in progress(chunks, desc, mininterval=2.0):
            for name, value in self._step(rows, level, sibling).items():
                sums[name] = sums.get(name, 0.0) + value
        means = {name: value / max(1, len(chunks)) for name, value in sums.items()}
        if not self.dist.is_distributed:
            return means
        reduced = self.dist.all_reduce_mean(torch.tensor(list(means.values()), dtype=torch.float64))
        return dict(zip(means, reduced.tolist(), strict=True))  # the same figures on every rank

    # ---------------------------------------------------------------- item distributions
    @torch.no_grad()
    def item_probs(self, level: int, batch: int = 2048) -> np.ndarray:
        """``[N, k]`` every item's level-``level`` token distribution given its assigned prefix."""
        self.model.eval()
        out = []
        codes = torch.as_tensor(self.codes)
        for start in range(1, self.num_items + 1, batch):
            items = torch.arange(start, min(start + batch, self.num_items + 1))
            memory, mask = self.model.encode_items(items)
            logits = self.model.level_logits(memory, mask, codes[items, : level - 1])[-1]  # [M, k]
            out.append(torch.softmax(logits, dim=-1).numpy())
        return np.concatenate(out)

    # ---------------------------------------------------------------- the schedule
    def train_level(self, level: int) -> dict[str, Any]:
        """Epochs of ``level`` until :class:`LevelConvergence`, then the capacity-constrained assignment
        (a warm level: from balanced k-means inside each parent, reassigned by evidence each epoch)."""
        c = self.config
        parents = group_ids(self.codes[1:, : level - 1])  # [N]
        self.hard_level = c.warm_start == "all" or (c.warm_start == "deeper" and level > 1)
        start: dict[str, Any] = {}
        if self.hard_level:
            vectors = self.model.items.id_embedding.weight.detach()[1:].numpy()  # [N, D]
            self.codes[1:, level - 1] = kmeans_within_parents(vectors, parents, c.k, self.ctx.seed)
            start = {"kmeans_" + n: v for n, v in self._level_apes(level).items()}
            log.info("URI level %d warm start: %s", level, start)
        converged = LevelConvergence(c, self._tokens(level))

        def run_epoch(epoch: int) -> dict[str, float]:
            self.detach = c.detach_targets or epoch <= c.detach_warmup_epochs
            self.evidence.reset()
            stats = self._epoch(level, f"URI level {level}/{c.levels} epoch {epoch}")
            if self.hard_level and level <= c.em_levels and epoch >= c.em_first_epoch:
                self._em_round(level, parents)
            tokens = self._tokens(level)
            converged.observe(stats["loss"], tokens)
            apes = self._level_apes(level) if self.hard_level else {}  # what each EM round did
            log.info(
                "URI level %d epoch %d: %s | tokens used %d/%d, changed %.3f, rel loss change %.4f",
                level,
                epoch,
                " ".join(f"{n}={v:.4f}" for n, v in {**stats, **apes}.items()),
                *(len(np.unique(tokens)), c.k, converged.changed, converged.rel),
            )
            entry = {"stage": f"level{level}", "epoch": epoch, **stats, "token_change": converged.changed}
            self.log.append({**entry, **apes})
            return stats

        result = run_epochs(c.level_max_epochs, run_epoch, converged, self.dist)
        probs = self._assign(level, parents) if not self.hard_level else self.item_probs(level)
        report = {"level": level, "epochs": result.epochs, **level_report(self.codes, level, self.queries)}
        report.update({**self._level_apes(level), **start})
        report["argmax_agreement"] = float((probs.argmax(1) == self.codes[1:, level - 1]).mean())
        report["evidence_coverage"] = self.evidence.coverage()
        log.info("URI level %d assigned: %s", level, report)
        return report

    def _tokens(self, level: int) -> np.ndarray:
        """``[N]`` the items' current level tokens: assigned ones on a warm level, else P_I's argmax."""
        if self.hard_level:
            return self.codes[1:, level - 1].copy()
        return self.item_probs(level).argmax(1)

    def _assign(self, level: int, parents: np.ndarray) -> np.ndarray:
        """Capacity-constrained tokens of ``level`` from P_I or from query evidence; returns P_I [N, k]."""
        c = self.config
        probs = self.item_probs(level)  # [N, k]
        scores = probs
        if c.assign_from == "queries" or self.hard_level:
            self.evidence.reduce(self.dist)  # every rank saw its shard of the pairs
            scores = self.evidence.scores(probs, c.evidence_prior)
        self.codes[1:, level - 1] = assign_level(scores, parents, c.k)
        return probs

    def _em_round(self, level: int, parents: np.ndarray) -> None:
        """A warm level's M-step: items move by query evidence; with ``em_accept: valid`` the move is
        undone when it raises the validation users' APE (then the decoder trains on and proposes again)."""
        before = self.codes[1:, level - 1].copy()
        old = self._level_apes(level)["ape_valid"] if self.config.em_accept == "valid" else np.inf
        self._assign(level, parents)
        if self._level_apes(level)["ape_valid"] > old:
            self.codes[1:, level - 1] = before

    def _level_apes(self, level: int) -> dict[str, float]:
        """APE of the index truncated at ``level``: training (``ape``) and validation users as queries."""
        apes = [level_report(self.codes, level, q)["ape"] for q in (self.queries, self.valid_queries)]
        return dict(zip(("ape", "ape_valid"), apes, strict=True))

    def train_ranker(self, index: TreeIndex) -> None:
        """The final stage: ranker (hard sibling negatives) + the memory loss of all L levels."""
        sibling = SiblingSampler(index, self.rng)
        self.set_encoder_lr_scale(self.config.ranker_encoder_lr_scale)

        def run_epoch(epoch: int) -> dict[str, float]:
            stats = self._epoch(0, f"URI ranker epoch {epoch}", sibling)
            log.info("URI ranker epoch %d: %s", epoch, " ".join(f"{n}={v:.4f}" for n, v in stats.items()))
            self.log.append({"stage": "ranker", "epoch": epoch, **stats})
            return stats

        run_epochs(self.config.ranker_epochs, run_epoch)

    def fit(self) -> tuple[TreeIndex, list[dict[str, Any]]]:
        """Levels 1..L, then the ranker stage; returns the index and one report per level."""
        with torch_threads(self.config.threads):
            reports = [
                self.train_level(level) for level in tqdm(range(1, self.config.levels + 1), desc="URI levels")
            ]
            self.hard_level = False
            index = TreeIndex.from_codes(self.codes, self.config.k, token_scheme="level")
            index.validate()
            self.train_ranker(index)
        return index, reports
