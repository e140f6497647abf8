"""Supervised fine-tuning: maximise log π(completion | prompt) on completion tokens only."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jaxalign.data import build_sft_dataset
from jaxalign.models import Transformer, token_logprobs_from_hidden
from jaxalign.models.moe import router_loss_terms
from jaxalign.models.transformer import softcap
from jaxalign.trainers import common, engine
from jaxalign.trainers.setup import setup_run

logger = logging.getLogger(__name__)


def sft_loss_fn(model: Transformer, *, chunk_size: int | None):
    """Σ_t −log π(x_t | x_<t)·loss_mask_t, with denominator Σ loss_mask (mean token NLL).

    Also, over the completion tokens (TRL's SFT metrics): `mean_token_accuracy`, the share whose
    most likely next token is the target, and `entropy`, the mean entropy of π there. They take
    one extra forward pass of the LM head, outside the gradient. A mixture-of-experts model adds
    its router load-balancing loss (`jaxalign.models.moe.router_loss_terms`).
    """
    logit_softcap = model.config.final_logit_softcap

    def loss_fn(params, batch, frozen, rng):
        del frozen, rng
        variables = {"params": params}
        hidden, router_stats = model.apply(
            variables,
            batch["input_ids"],
            batch["attention_mask"],
            batch["positions"],
            return_hidden=True,
            return_router_stats=True,
        )
        hidden = hidden[:, :-1]
        output_embedding = model.apply(variables, method="output_embedding")
        targets = batch["input_ids"][:, 1:]
        logprobs, _ = token_logprobs_from_hidden(
            hidden,
            output_embedding,
            targets,
            chunk_size=chunk_size,
            with_entropy=False,
            logit_softcap=logit_softcap,
        )
        correct, entropy = token_accuracy_and_entropy(
            jax.lax.stop_gradient(hidden),
            jax.lax.stop_gradient(output_embedding),
            targets,
            chunk_size=chunk_size,
            logit_softcap=logit_softcap,
        )
        mask = batch["loss_mask"][:, 1:]  # loss_mask[:, 0] is 0: nothing predicts token 0
        tokens = mask.sum()
        router_loss, router_metrics = router_loss_terms(model.config, router_stats, tokens)
        return -(logprobs * mask).sum() + router_loss, {
            "denominator": tokens,
            "metrics": {
                "mean_token_accuracy": (correct * mask).sum(),
                "entropy": (entropy * mask).sum(),
                **router_metrics,
            },
            "counts": {"tokens": tokens},
        }

    return loss_fn


def token_accuracy_and_entropy(
    hidden: jax.Array,
    output_embedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int | None,
    logit_softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`(correct [B, T], entropy [B, T])`: 1.0 where argmax_v logits = target, and H(π(·|x_<t)).

    Forward only; chunked along T like `token_logprobs_from_hidden`, so the `[B, C, V]` logits of
    one chunk are the most it holds.
    """

    def stats(hidden_chunk, target_chunk):
        batch, chunk, embed = hidden_chunk.shape
        logits = jnp.dot(
            hidden_chunk.reshape(batch * chunk, embed),
            output_embedding.astype(hidden_chunk.dtype),
            preferred_element_type=jnp.float32,
        ).reshape(batch, chunk, -1)
        logits = softcap(logits, logit_softcap)
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        entropy = log_norm - jnp.sum(jnp.exp(logits - log_norm[..., None]) * logits, axis=-1)
        correct = (jnp.argmax(logits, axis=-1) == target_chunk).astype(jnp.float32)
        return correct, entropy

    batch, seq_len, _ = hidden.shape
    if chunk_size is None or chunk_size >= seq_len:
        return stats(hidden, targets)
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    chunks = (
        hidden.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1),
        targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1),
    )
    correct, entropy = jax.lax.map(lambda xs: stats(*xs), chunks)
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, -1)[:, :seq_len]  # noqa: E731
    return unchunk(correct), unchunk(entropy)


def train(config: ml_collections.ConfigDict, workdir: Path) -> engine.RunResult:
    setup = setup_run(config)

    def dataset(spec: str, split: str):
        return build_sft_dataset(
            common.data_source(spec, config.data),
            setup.tokenizer,
            max_length=config.data.max_length,
            split=split,
            on_bad_row=config.data.on_bad_row,
            on_long_row=config.data.on_long_row,
            pack=config.data.pack,
            buckets=tuple(config.data.buckets),
        )

    train_data = dataset(config.data.train, config.data.train_split)
    logger.debug("SFT data: %s", train_data.stats)
    eval_data = dataset(config.data.eval, config.data.eval_split) if config.data.eval else None
    return engine.train_offline(
        config,
        workdir,
        setup,
        loss_fn=sft_loss_fn(setup.model, chunk_size=config.model.logits_chunk_size or None),
        train_data=train_data,
        eval_data=eval_data,
        tokens_per_batch=lambda b: int((b["attention_mask"] != 0).sum()),
    )
