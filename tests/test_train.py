"""End to end on the CPU: the CLI trains, logs and checkpoints; resume reproduces the losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, cli_train, cut_back, final_weights, read_losses, read_metric,
                     read_metrics, read_summary, run_train)


def test_resume_reproduces_losses_and_weights(tmp_path, tiny):
    """20 steps straight == 10 steps, stop, resume to 20 (fp32, CPU, 1e-6 relative)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(**{"train.steps": 20, "checkpoint.every": 10, "model.dropout": 0.1})
    assert cli_train(tiny(**common, **{"logging.run_dir": straight})) == 0
    # the interrupted run: trains to step 10 and is killed before step 11 would be written
    assert cli_train(tiny(**common, **{"logging.run_dir": resumed})) == 0
    cut_back(resumed, 10, 20)
    assert cli_train(tiny(**common, **{"logging.run_dir": resumed})) == 0

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 21)), "every step exactly once"
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    wa, wb = final_weights(straight, 20), final_weights(resumed, 20)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=0)


def test_resume_from_different_steps_continues_and_meta(tmp_path, tiny):
    run = tmp_path / "run"
    assert cli_train(tiny(**{"logging.run_dir": run, "checkpoint.every": 3,
                             "checkpoint.keep_last": 1})) == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_6"], "keep_last=1 keeps only the newest"
    meta = json.loads((run / "checkpoints" / "step_6" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["tokens"] == 6 * 8 * 32
    # extend the run: more steps resume from step 6
    assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 8})) == 0
    assert read_metric(run, "step") == list(range(1, 9))
    summary = read_summary(run)
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 8 * 32


def test_run_dir_with_a_different_run_is_refused(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 2})) == 0
    before = (run / "metrics.jsonl").read_text()
    assert cli_train(tiny(**{"logging.run_dir": run, "model.d_model": 32})) == 2
    err = capsys.readouterr().err
    assert "already holds a run with different model or data settings" in err
    assert "model.d_model: 64 -> 32" in err, "the refusal names the key, old and new values"
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_from_another_run_names_the_keys_that_differ(tmp_path, tiny, capsys):
    run = tmp_path / "a"
    assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 2})) == 0
    code = cli_train(tiny(**{"logging.run_dir": tmp_path / "b", "model.n_layers": 3,
                             "checkpoint.resume": run / "checkpoints" / "step_2"}))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.n_layers: 2 -> 3" in err[0], err


def test_a_run_that_failed_before_its_first_step_does_not_block_the_fix(tmp_path, tiny, capsys):
    """A config error found after config.yaml was written (the tokenizer does not fit the
    vocabulary) must not make the corrected rerun look like a different run. The corpus is the
    docs folder's paragraphs (data.source=files): a run naming its own data.tokenizer tokenizes
    its corpus afresh, which for the session's stdlib corpus took ~20 s."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": para}) + "\n"
                            for p in sorted((ROOT / "docs").glob("*.md"))
                            for para in p.read_text().split("\n\n") if para.strip()))
    files = {"data.source": "files", "data.paths": f"[{docs}]",
             "data.cache_dir": str(tmp_path / "cache")}
    ok = tmp_path / "ok"
    assert cli_train(tiny(**files, **{"logging.run_dir": ok, "train.steps": 1})) == 0
    run = tmp_path / "run"
    bad = {**files, "logging.run_dir": run, "data.tokenizer": ok / "tokenizer.json",
           "model.vocab_size": 256, "train.steps": 2}
    assert cli_train(tiny(**bad)) == 2
    assert "model.vocab_size=256" in capsys.readouterr().err
    assert (run / "config.yaml").is_file()
    assert cli_train(tiny(**{**bad, "model.vocab_size": 1024})) == 0
    assert read_metric(run, "step") == [1, 2]


def _snapshot(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_rerunning_a_finished_run_changes_nothing_and_more_steps_extend_it(tmp_path, tiny,
                                                                          capsys):
    run = tmp_path / "run"
    args = tiny(**{"logging.run_dir": run, "train.steps": 4, "train.eval_every": 2})
    assert cli_train(args) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert cli_train(args) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "step_4" in out and "raise train.steps" in out
    assert _snapshot(run) == before, "no file rewritten"
    assert read_summary(run)["final_val_loss"] is not None
    assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 6,
                             "train.eval_every": 2})) == 0
    summary = read_summary(run)
    assert summary["steps"] == 6 and summary["final_val_loss"] is not None


def test_accumulation_equals_one_big_micro_batch(tmp_path, tiny):
    """Gradient accumulation normalises by the global token count: same losses either way."""
    runs = {}
    for mb in (8, 2):
        run = tmp_path / f"mb{mb}"
        assert cli_train(tiny(**{"logging.run_dir": run, "train.micro_batch_size": mb})) == 0
        runs[mb] = read_losses(run)
    assert runs[2] == pytest.approx(runs[8], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "bf16_pure"])
def test_bf16_precisions_train(tmp_path, tiny, precision):
    run = tmp_path / precision
    assert cli_train(tiny(**{"logging.run_dir": run, "train.precision": precision,
                             "train.steps": 8, "optim.lr": 0.01})) == 0
    losses = read_losses(run)
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]


def test_default_run_through_the_cli(tmp_path):
    """`llmtrain train` (the embedded tiny config) runs end to end; a few steps here."""
    run = tmp_path / "tiny"
    r = run_train(["train.steps=4", "train.eval_steps=1", f"logging.run_dir={run}",
                   "train.log_every=2"], timeout=600)
    assert "done: 4 steps" in r.stdout
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir()), "TensorBoard events written"
    rec = read_metrics(run)[-1]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
            "peak_memory_gib"} <= rec.keys()
    assert (run / "checkpoints" / "step_4" / "meta.json").is_file()


def test_full_activation_checkpointing_gives_the_same_losses(tmp_path, tiny):
    runs = {}
    for ac in ("none", "full"):
        run = tmp_path / ac
        assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 3,
                                 "parallel.activation_checkpointing": ac,
                                 "model.dropout": 0.1})) == 0
        runs[ac] = read_losses(run)
    assert runs["full"] == pytest.approx(runs["none"], rel=1e-6)
