"""Context parallelism (parallel/context.py: sequences split over cp ranks, attention by
all-to-all) against the single-process run with the same global batch: per-step losses within
1e-5 relative and the final weights within ATOL, alone and with ZeRO-3 data parallelism, tensor
(+ sequence) parallelism and pipeline stages; a cp x dp checkpoint resumed on one process; document
masking (positions restarting per document) with documents crossing the cp split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import (PARALLEL_STEPS, assert_weights_close, cli_train, cut_back, final_weights,
                     parallel_overrides, read_losses, read_metric, run_train, seeded_model,
                     tiny_model_config, tokens)
from llmtrain.config import ConfigError, load_config
from llmtrain.data.loader import Batch, context_part, document_positions
from llmtrain.parallel.expert import expert_mesh_ranks

STEPS = PARALLEL_STEPS
# GQA (4 query heads, 2 kv heads): at cp=4, and at cp=2 x tp=2 (one kv head per tp rank), the
# kv heads are fewer than cp and get repeated. Untied embeddings: the pp=2 layout puts the
# embedding and the output layer on two stages.
MODEL = {"model.n_kv_heads": 2, "model.tie_embeddings": False}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The single-process run of MODEL plus `extra` model settings that a layout is compared with
    (losses, final weights, gradient norms, its run directory), run once per settings."""
    runs = {}

    def reference(**extra):
        key = tuple(sorted(extra.items()))
        if key not in runs:
            run = tmp_path_factory.mktemp("cp_reference") / "ref"
            assert cli_train(parallel_overrides(run, **MODEL, **extra)) == 0
            runs[key] = (read_losses(run), final_weights(run, STEPS), read_metric(run, "grad_norm"),
                         run)
        return runs[key]
    return reference


@pytest.fixture(scope="module")
def reference(references):
    return references()


# A sliding window (8 of the 32 tokens; every other layer global): each cp rank's model builds the
# window mask over the whole sequence, whose length it reads from the doc ids the loader passes.
WINDOW = {"model.attention_window": 8, "model.attention_global_every": 2}
LAYOUTS = {
    # name: (processes, parallel overrides, model settings on top of MODEL)
    "cp4-zero1": (4, {"parallel.cp": 4, "parallel.zero_stage": 1}, {}),
    "cp2xtp2-sp": (4, {"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True},
                   {}),
    "cp2xpp2": (4, {"parallel.cp": 2, "parallel.pp": 2}, {}),
    "cp2-window": (2, {"parallel.cp": 2}, WINDOW),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cp_layout_matches_single_process(name, tmp_path, references):
    nproc, par, model = LAYOUTS[name]
    ref_losses, ref_weights, ref_norms, _ = references(**model)
    run = tmp_path / name
    r = run_train(parallel_overrides(run, **MODEL, **model, **par), nproc=nproc)
    assert f"cp {par['parallel.cp']}," in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    # the clipped norm counts every gradient once (not once per cp rank)
    assert read_metric(run, "grad_norm") == pytest.approx(ref_norms, rel=1e-4)
    assert_weights_close(final_weights(run, STEPS), ref_weights)


# MoE (top-2 of 4 experts in every layer) with capacity 4 x the fair share, so nothing drops (an
# expert takes at most one of each token's k assignments, n of a rank's n tokens, and its
# capacity is 4 x 2 n / 4 = 2 n), and no balance loss: each token's output is then the same
# whatever tokens share its rank. The z-loss (ST-MoE eq. 5) is on: a mean over tokens, so each
# rank's mean over its T/cp tokens, averaged over dp x cp as the gradients are, is the single
# process's; a router-loss term counted once per cp rank would move the router weights and
# double the logged term. The aux-free bias (DeepSeek-V3) moves by the load summed over dp x cp,
# the single process's load: a fast rate makes it change routing within the 5 steps, so cp
# ranks that disagreed on it would route differently.
MOE = {"model.moe.num_experts": 4, "model.moe.router": "topk", "model.moe.top_k": 2,
       "model.moe.capacity_factor": 4.0, "model.moe.every_n_layers": 1,
       "model.activation": "swiglu", "model.moe.aux_loss_coef": 0.0, "model.moe.z_loss_coef": 0.1,
       "model.moe.aux_free_bias": True, "model.moe.bias_update_rate": 0.05}


def test_expert_groups_lie_at_one_cp_index():
    """Mesh (dp_shard 4, cp 2), ranks 2 s + c: the ep=2 groups pair dp_shard neighbours at the
    same cp index (ep divides dp_shard, as the planner's link model assumes); the ranks holding
    the same experts are the other dp_shard chunk's and the cp ranks'."""
    ranks = torch.arange(8).reshape(1, 1, 4, 2, 1)
    groups = expert_mesh_ranks(ranks, 2)[0, ..., 0]  # (ep_replicate, ep)
    assert groups.tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(groups[:, 0].tolist()) == [0, 1, 4, 5]  # the replicas of ep rank 0's experts


def test_cp2xep2_moe_matches_single_process(tmp_path, references):
    """cp=2 x ep=2 at ZeRO-3 (experts an FSDP unit over the ranks holding the same experts, cp
    ranks among them) equals the single-process MoE run, router z-loss included."""
    ref_losses, ref_weights, ref_norms, ref_run = references(**MOE)
    run = tmp_path / "cp2xep2"
    r = run_train(parallel_overrides(run, **MODEL, **MOE, **{
        "parallel.cp": 2, "parallel.ep": 2, "parallel.zero_stage": 3}), nproc=4)
    assert "dp 2, cp 2," in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    aux = read_metric(run, "moe_aux_loss")
    assert min(aux) > 0 and aux == pytest.approx(read_metric(ref_run, "moe_aux_loss"), rel=1e-5)
    assert read_metric(run, "grad_norm") == pytest.approx(ref_norms, rel=1e-4)
    assert_weights_close(final_weights(run, STEPS), ref_weights)


def test_cp2xdp2_zero3_checkpoint_resumes_on_one_process(tmp_path, reference):
    """cp=2 x dp=2 ZeRO-3 (FSDP over dp_shard x cp) equals the single-process run; its step-3
    checkpoint, resumed on one process, finishes steps 4-5 as the uninterrupted run did (one
    run checks the layout and the reshard to a non-cp layout)."""
    ref_losses, ref_weights, ref_norms, _ = reference
    run = tmp_path / "cp2xdp2"
    args = parallel_overrides(run, **MODEL, **{"checkpoint.every": 3})
    r = run_train(args + ["parallel.cp=2", "parallel.zero_stage=3"], nproc=4)
    assert "dp 2, cp 2," in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    assert read_metric(run, "grad_norm") == pytest.approx(ref_norms, rel=1e-4)
    assert_weights_close(final_weights(run, STEPS), ref_weights)
    cut_back(run, 3, STEPS)
    r = run_train(args, nproc=1)
    assert "resumed from" in r.stdout and "step_3" in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), ref_weights)


# ----------------------------------------------------------------------------------------------
# Document masking (data.reset_attention_at_eod)


def test_document_positions_restart_and_cp_parts():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]])
    pos = document_positions(doc_ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]
    batch = Batch(tokens(2, 8), tokens(2, 8, seed=2), torch.ones(2, 8), doc_ids, [0, 1],
                  positions=pos)
    parts = [context_part(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p.tokens for p in parts], 1), batch.tokens)
    assert torch.equal(torch.cat([p.positions for p in parts], 1), pos)
    assert all(p.doc_ids is doc_ids for p in parts)  # the mask covers the whole sequence
    plain = context_part(Batch(batch.tokens, batch.labels, batch.loss_mask, None, [0, 1]), 1, 2)
    assert plain.positions.tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_document_sees_only_itself(position):
    """A row packing [doc A | doc B], with the block-diagonal mask and positions restarting at
    doc B, gives doc B the logits of doc B alone (mask + restart = isolation)."""
    m = seeded_model(tiny_model_config(position=position))
    a, b = tokens(1, 7, seed=3), tokens(1, 9, seed=4)
    row = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = m(row, doc_ids=doc_ids, positions=document_positions(doc_ids))
        alone = m(b)
        torch.testing.assert_close(packed[:, 7:], alone, rtol=1e-5, atol=1e-5)
        # without the restart a learned-position model places doc B at 7..15
        shifted = m(row, doc_ids=doc_ids)
    if position == "learned":
        assert (shifted[:, 7:] - alone).abs().max() > 1e-3


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """An indexed corpus of documents of 3-20 words: most 32-token rows hold several, and
    many cross the middle of the row (the cp=2 split)."""
    from llmtrain.data.preprocess import preprocess
    d = tmp_path_factory.mktemp("short_docs")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with (d / "docs.jsonl").open("w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 20))))})
                    + "\n")
    preprocess([str(d / "docs.jsonl")], str(d / "docs"), "train:300", progress=False,
               log=lambda *a: None)
    return d / "docs"


def test_cp2_with_documents_crossing_the_split(tmp_path, short_docs):
    """reset_attention_at_eod with learned positions (so a wrong restart changes the loss):
    cp=2 equals one process, on rows whose documents cross the split."""
    from llmtrain.data.loader import BatchReader, build_datasets
    from llmtrain.data.tokenizer import Tokenizer
    sets = {**MODEL, "model.position": "learned", "model.vocab_size": 512,
            "data.source": "indexed", "data.paths": f"[{short_docs}]",
            "data.reset_attention_at_eod": True, "data.mask_eod_loss": True}
    cfg = load_config(None, parallel_overrides(tmp_path, **sets))
    tok = Tokenizer.load(f"{short_docs}.tokenizer.json")
    batch = BatchReader(build_datasets(cfg, str(short_docs), tok)[0], cfg, tok).get(0, 0)
    half = batch.tokens.shape[1] // 2
    crossing = (batch.doc_ids[:, half - 1] == batch.doc_ids[:, half]).sum()
    assert crossing >= 2 and (batch.doc_ids[:, -1] >= 1).all(), "documents cross the split"

    ref, run = tmp_path / "ref", tmp_path / "cp2"
    assert cli_train(parallel_overrides(ref, **sets)) == 0
    run_train(parallel_overrides(run, **sets, **{"parallel.cp": 2}), nproc=2)
    assert read_losses(run) == pytest.approx(read_losses(ref), rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), final_weights(ref, STEPS))


# ----------------------------------------------------------------------------------------------
# What context parallelism cannot run


@pytest.mark.parametrize("sets, world, message", [
    ({"parallel.cp": 2, "model.arch": "encoder_decoder", "model.n_encoder_layers": 1,
      "model.n_decoder_layers": 1}, 2,
     "parallel.cp=2 with model.arch=encoder_decoder is not supported"),
    ({"parallel.cp": 2, "model.mixer": "gmlp"}, 2, "parallel.cp=2 with model.mixer=gmlp"),
    ({"parallel.cp": 2, "parallel.compile": True}, 2, "parallel.compile=true"),
    # ZeRO-1 gives each expert tensor one owner among the dp x cp / ep = 4 ranks holding the same
    # experts: one GeLU MoE layer has only 2
    ({"parallel.cp": 2, "parallel.ep": 2, "parallel.zero_stage": 1, "model.moe.num_experts": 4,
      "model.activation": "gelu", "model.moe.every_n_layers": 2}, 8,
     r"splits the expert weights (2 tensors) over the 4 ranks holding the same experts"),
    ({"parallel.cp": 2, "parallel.engine": "deepspeed"}, 2, "parallel.engine=deepspeed"),
    ({"parallel.cp": 4, "train.seq_len": 30}, 4,
     "train.seq_len=30 is not divisible by parallel.cp=4; use a multiple of 4"),
    ({"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True,
      "train.seq_len": 30}, 4, "parallel.cp=2 x parallel.tp=2 (sequence parallel)"),
    ({"parallel.cp": 4, "parallel.tp": 2}, 8,
     "model.n_heads=4 is not divisible by parallel.cp=4 x parallel.tp=2 = 8"),
    ({"parallel.cp": 2, "parallel.tp": 2, "model.position": "learned",
      "data.reset_attention_at_eod": True, "parallel.sequence_parallel": True}, 4,
     "reset_attention_at_eod with position=learned and parallel.sequence_parallel"),
])
def test_cp_refuses_what_it_cannot_run(tmp_path, sets, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, parallel_overrides(tmp_path, **sets), world_size=world)
