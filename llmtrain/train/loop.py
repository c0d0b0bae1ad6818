"""The training loop: one function, `train(cfg)`, the same on one CPU process and on many GPUs.

The `Trainer` builds a run (data, model, optimizer, the engine's step object of train/step.py,
resume) and runs it (logging, evaluation, checkpoint policy, stops); the step itself and its loss
normalisation are in train/step.py.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from llmtrain.config import (Config, ConfigError, config_from_dict, read_yaml_file, save_config,
                             validate)
from llmtrain.config.layout import DistEnv
from llmtrain.data.loader import (BatchReader, Seq2SeqReader, SpanCorruptionReader,
                                  build_datasets, build_pair_datasets, check_vocab)
from llmtrain.data.preprocess import prepare_corpus
from llmtrain.engines import deepspeed as deepspeed_engine
from llmtrain.model import build_model
from llmtrain.parallel import build_optimizer, parallelize
from llmtrain.parallel.data import dp_mesh
from llmtrain.parallel.mesh import (cp_info, describe_groups, dp_info, init_distributed,
                                    on_rank0_then_agree, resolve_device)
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.guards import HangWatchdog, SpikeDetector, StopSignal
from llmtrain.train.memory import PeakMemory
from llmtrain.train.metrics import MetricsWriter, device_peak_flops, peak_memory_gib
from llmtrain.train.rundir import RunDir, RunDirLock, RunError
from llmtrain.train.optim import describe_optimizer, lr_at
from llmtrain.train.step import DataParallelGroup, StepResult, TrainStep, build_step


def _last_line(e: BaseException) -> str:
    """The root cause of a (possibly wrapped, multi-line) exception in one line."""
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e.strerror or e}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def check_run_dir(cfg: Config, overwrite: bool = False, world_size: int | None = None) -> None:
    """Refuse to mix two different runs in one directory (extending a run is fine). Only a run
    that left checkpoints is protected: one that failed before its first checkpoint has nothing
    to lose, and its config.yaml must not block the corrected rerun. `world_size`: the job's
    (default: the process group's; `llmtrain train --check N` checks before any process starts)."""
    saved = Path(cfg.logging.run_dir) / "config.yaml"
    if overwrite or not saved.is_file() or not ckpt.list_checkpoints(ckpt.checkpoint_dir(cfg)):
        return
    try:
        # Only the model and data must match (the layout, batch split and steps may change
        # between jobs: checkpoints reshard on load), so the saved model and data sections are
        # read into this job's config and validated at this job's world size.
        saved_data = read_yaml_file(saved, "saved config") or {}
        data = cfg.to_dict()
        data.update({k: saved_data.get(k, {}) for k in ("model", "data")})
        old = config_from_dict(data)
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        validate(old, world_size=world_size)
    except (ConfigError, TypeError, AttributeError):
        old = None
    if old is None or ckpt.config_hash(old) != ckpt.config_hash(cfg):
        what = ("its config.yaml is unreadable" if old is None else
                ckpt.config_diff(ckpt.run_identity(old), ckpt.run_identity(cfg)))
        raise ConfigError(f"logging.run_dir={cfg.logging.run_dir!r} already holds a run with "
                          f"different model or data settings ({what}); choose another run_dir "
                          f"or pass --overwrite")


def _one_builder_first(env, build):
    """`build()` on global rank 0, then on the first rank of every other node, then on the rest,
    with a barrier after each stage: the corpus cache is written by whoever first misses it, so
    concurrently one rank would read another's half-written files. The second stage covers
    node-local cache directories; on a shared one it only reads."""
    result = None
    for mine in (env.rank == 0, env.local_rank == 0 and env.rank != 0, env.local_rank != 0):
        if mine:
            result = build()
        if dist.is_initialized():
            dist.barrier()
    return result


class Trainer:
    """Holds the state of one run: built by `__init__` (data, model, optimizer, step, resume),
    trained to `train.steps` by `run()` (logging, evaluation, checkpoint policy)."""

    def __init__(self, cfg: Config, overwrite: bool = False, log=print):
        self.cfg = cfg
        self.env = env = DistEnv.from_environ()
        self.is_main = env.rank == 0
        self.device = resolve_device(cfg, env)
        self.peak_flops = device_peak_flops(self.device)  # for MFU; None off the GPU
        self.mesh = init_distributed(cfg, env, self.device)
        self.run_dir = Path(cfg.logging.run_dir)
        self.files = RunDir(self.run_dir, last_good=self.last_good_checkpoint)

        def claim_run_dir():
            check_run_dir(cfg, overwrite)
            with self.files.writing("config.yaml") as path:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, path)
        on_rank0_then_agree(claim_run_dir)
        self.say = log if self.is_main else (lambda *a, **k: None)
        dp_rank, dp_size = dp_info(self.mesh)
        self.dp_rank = dp_rank
        self.cp_rank, cp = cp_info(self.mesh)
        # gradients and token counts over dp x cp; the readers split the batch over dp, and
        # each keeps its cp rank's part of the sequences
        self.dp = DataParallelGroup(dp_mesh(self.mesh).get_group() if self.mesh is not None
                                    else None, dp_size * cp, cp)
        self.tp = self.mesh["tp"].size() if self.mesh is not None else 1
        n_train, n_valid = self._build_data()
        self._build_model()
        self._resume()
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self._describe(n_train, n_valid)

    def _build_data(self) -> tuple[int, int]:
        """Tokenizer, corpus cache and this dp rank's batch readers; (train, valid) sample
        counts. The corpus cache is built by one process and then found by the others (see
        `_one_builder_first`); megatron-core's builder stages its index cache the same way."""
        cfg = self.cfg
        prefix, tok = _one_builder_first(self.env, lambda: prepare_corpus(cfg, log=self.say))
        if self.is_main:
            with self.files.writing("tokenizer.json") as path:  # export and generate read it
                tmp = path.with_name(".tokenizer.json.tmp")
                tok.save(tmp)
                os.replace(tmp, path)
        if cfg.data.source == "indexed":
            for p in ([p for _, p in cfg.data.blend] if cfg.data.blend else [prefix]):
                check_vocab(str(p), cfg.model.vocab_size)
        pairs = bool(cfg.data.source_field)  # encoder-decoder on source -> target pairs
        train_ds, valid_ds = (build_pair_datasets(cfg, prefix, tok) if pairs
                              else build_datasets(cfg, prefix, tok))
        self.tokenizer = tok
        reader = (Seq2SeqReader if pairs else SpanCorruptionReader
                  if cfg.model.arch == "encoder_decoder" else BatchReader)
        part = {"cp_rank": self.cp_rank, "cp_size": self.dp.cp} if self.dp.cp > 1 else {}
        self.train_reader = reader(train_ds, cfg, tok, self.dp_rank, self.dp.readers, **part)
        self.valid_reader = reader(valid_ds, cfg, tok, self.dp_rank, self.dp.readers, **part)
        return len(train_ds), len(valid_ds)

    def _build_model(self) -> None:
        """The model, built on the meta device, sharded, then materialised and initialised shard
        by shard (the single-process weights of train.seed at every layout: parallel/init.py);
        its optimizer; the step object of the engine; the background checkpoint saver."""
        cfg = self.cfg
        self.peaks = PeakMemory(self.device)  # the baseline: all but the model (train/memory.py)
        self.memory_record: dict | None = None  # the first step's, for memory_rank<R>.json
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, "meta")
        self.n_params = model.num_params(non_embedding=False)
        self.n_params_nonemb = model.num_params(non_embedding=True)
        self.flops_per_token = model.flops_per_token(cfg.train.seq_len)
        if cfg.train.precision == "bf16_pure":
            model = model.to(torch.bfloat16)
        parallel = parallelize(model, self.mesh, cfg, self.device)
        init_s = parallel.init_s
        self.model = parallel.module
        self.optimizer = build_optimizer(self.model, cfg, self.mesh)
        self.engine = None  # parallel.engine=deepspeed: engines/deepspeed.py drives the model
        if cfg.parallel.engine == "deepspeed":
            self.engine, ds_init_s = deepspeed_engine.initialize(self.model, cfg, self.dp.size,
                                                                 self.optimizer, log=self.say)
            init_s += ds_init_s  # ZeRO-3: the partitions are initialised there
            self.model, self.optimizer = self.engine, self.engine.optimizer
            self.step_fn: TrainStep = deepspeed_engine.DeepSpeedStep(self.engine, cfg,
                                                                     self.device, self.dp)
        else:
            self.step_fn = build_step(parallel, self.optimizer, cfg, self.device, self.dp,
                                      self.tp)
        self.init_s = init_s  # reported by _describe
        self.stop_group = None  # the group the ranks agree to stop over (_agreed_stop)
        # checkpoint.async: periodic saves written in the background (its own gloo group)
        self.saver = (ckpt.AsyncSaver(cfg.train.collective_timeout_s)
                      if cfg.checkpoint.async_save else None)
        self.peaks.mark("init")

    def _resume(self) -> None:
        """Load the checkpoint `checkpoint.resume` names (or the newest good one), if any."""
        cfg = self.cfg
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0  # a checkpoint written while > 0 is marked diverged
        resume = ckpt.find_resume(cfg)
        meta: dict = {}
        if resume is not None:
            meta = (deepspeed_engine.load_checkpoint(self.engine, cfg, self.device, resume)
                    if self.engine is not None
                    else ckpt.load(resume, self.model, self.optimizer, cfg, self.device))
            self.step = meta["step"]
            self.skipped_total = meta.get("skipped_steps", 0)
            self.say(f"resumed from {resume} at step {self.step}")
        if resume is None or meta.get("model_only"):  # a model-only checkpoint has no RNG state
            # dropout streams differ by data-parallel rank; the ranks of one tp group share one
            torch.manual_seed(cfg.train.seed + 1 + self.dp_rank)
        self.first_step = self.step

    def _describe(self, n_train: int, n_valid: int) -> None:
        cfg, t, say = self.cfg, self.cfg.train, self.say
        say(f"model: {self.n_params:,} parameters ({self.n_params_nonemb:,} non-embedding), "
            f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads "
            f"({cfg.model.kv_heads} kv), vocab {cfg.model.vocab_size}; this rank's parameters "
            f"initialised in {self.init_s:.2f} s")
        sp = " (sequence parallel)" if self.tp > 1 and cfg.parallel.sequence_parallel else ""
        say(f"layout: world {self.env.world_size} on {self.device.type}, dp {self.dp.readers}, "
            f"cp {self.dp.cp}, tp {self.tp}{sp}, ZeRO stage {cfg.parallel.zero_stage}; "
            + "; ".join(describe_groups(self.mesh)))
        say(f"batch: {t.global_batch_size} sequences x {t.seq_len} tokens = "
            f"{self.tokens_per_step:,} tokens/step, micro-batch {t.micro_batch_size}, "
            f"{self.train_reader.n_micro} accumulation steps; {t.steps} steps, precision "
            f"{t.precision}")
        say(f"data: {n_train:,} training / {n_valid:,} validation samples; "
            f"run dir {self.run_dir}")
        if self.engine is None:  # DeepSpeed reports its own optimizer
            say(f"optimizer: {describe_optimizer(self.optimizer)}")

    # ------------------------------------------------------------------------------------------

    def _report_state_bytes(self, state: dict[str, int]) -> None:
        """After the first optimizer step (when gradients and optimizer states exist): this
        rank's model-state bytes and peak memory to `<run_dir>/memory_rank<R>.json`; rank 0
        prints every rank's model state."""
        self.peaks.mark("step")
        rec = {"rank": self.env.rank, "step": self.step + 1, "n_params": self.n_params, **state}
        self.memory_record = rec
        self._write_memory_record()
        recs = [rec]
        if dist.is_initialized():
            recs = [None] * dist.get_world_size()
            dist.all_gather_object(recs, rec)
        mib = 2 ** 20
        for r in recs:
            self.say(f"rank {r['rank']} model state: parameters {r['param_bytes'] / mib:.2f} MiB, "
                     f"gradients {r['grad_bytes'] / mib:.2f} MiB, optimizer "
                     f"{r['optim_bytes'] / mib:.2f} MiB")

    def _write_memory_record(self) -> None:
        """`memory_rank<R>.json`: the first step's model state and the peaks so far."""
        rec = {**self.memory_record, **self.peaks.record()}
        self.files.write_text(f"memory_rank{self.env.rank}.json", json.dumps(rec))

    def train_step(self, step: int) -> StepResult:
        """Optimizer step `step` (0-based) on this rank's micro-batches of it, at its LR."""
        cfg, reader = self.cfg, self.train_reader
        batches = [reader.get(step, m) for m in range(reader.n_micro)]
        lr = lr_at(step, cfg.optim, cfg.train.steps, cfg.model.d_model)
        out = self.step_fn(batches, lr, measure_state=step == self.first_step)
        if out.state_bytes is not None:
            self._report_state_bytes(out.state_bytes)
        return out

    def evaluate(self) -> float:
        return self.step_fn.evaluate(self.valid_reader, self.cfg.train.eval_steps)

    def save_checkpoint(self, final: bool = False, writer: MetricsWriter | None = None) -> bool:
        """Write a checkpoint; on a write error (disk full, unwritable directory) report it, drop
        the partial directory and keep the last good checkpoint. A failed final save is fatal.
        With checkpoint.async, periodic saves return after staging; a background save that
        failed is reported here, at the next save."""
        if self.saver is not None:
            self.finish_async_save(writer)
        try:
            if self.saver is not None and not final:
                self._save_checkpoint(self.saver.save)
            else:
                self._save_checkpoint()
            self.peaks.mark("save")  # since the first step: evaluation, logging and this save
            if self.memory_record is not None:
                self._write_memory_record()
            return True
        except (OSError, CheckpointException) as e:
            root = ckpt.checkpoint_dir(self.cfg)
            if self.is_main:
                import shutil
                shutil.rmtree(root / f".step_{self.step}.tmp", ignore_errors=True)
            msg = (f"checkpoint at step {self.step} could not be written to {root} "
                   f"({_last_line(e)}); last good checkpoint: {self.last_good_checkpoint()}")
            if final:
                raise RunError(msg) from None
            (writer.message if writer else self.say)(f"warning: {msg}; training continues")
            return False

    def _save_checkpoint(self, save=ckpt.save) -> None:
        if self.engine is not None:
            deepspeed_engine.save_checkpoint(self.engine, self.cfg, self.step, self.device,
                                             self.checkpoint_extra())
            return
        save(ckpt.checkpoint_dir(self.cfg), self.step, self.model, self.optimizer, self.cfg,
             self.device, self.checkpoint_extra(), keep_last=self.cfg.checkpoint.keep_last)

    def checkpoint_extra(self) -> dict:
        """What meta.json records beside the step and config, for either engine."""
        return {"tokens": self.step * self.tokens_per_step, "skipped_steps": self.skipped_total,
                "diverged": self.consecutive_skips > 0}

    def last_good_checkpoint(self) -> str:
        """The newest checkpoint not marked diverged, the one a rerun with `resume: auto` loads,
        for messages. Not re-verified here: naming it must not re-read every shard (the rerun
        verifies it, and falls back past it if damaged)."""
        good = [p for p in ckpt.list_checkpoints(ckpt.checkpoint_dir(self.cfg))
                if not ckpt.is_diverged(p)]
        return str(good[-1]) if good else "none"

    def finish_async_save(self, writer: MetricsWriter | None = None) -> None:
        """Wait for the background save in flight; a failure is a warning (the previous
        checkpoint stays the last good one), as for a synchronous periodic save."""
        try:
            self.saver.wait()
        except ckpt.AsyncSaveError as e:
            (writer.message if writer else self.say)(
                f"warning: checkpoint {e}; last good checkpoint: "
                f"{self.last_good_checkpoint()}; training continues")

    def _agreed_stop(self, requested: str | None) -> str | None:
        """Every rank stops after the same step if any rank was asked to (SIGTERM or Ctrl-C),
        and all name the same signal (SIGINT over SIGTERM), which sets the exit code."""
        if not dist.is_initialized():
            return requested
        if self.stop_group is None and self.device.type != "cpu":
            # a CPU flag over gloo: an NCCL all-reduce read back with .item() would wait for
            # the step's kernels every step (a host sync the step itself avoids: train/step.py)
            self.stop_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
                seconds=self.cfg.train.collective_timeout_s))
        codes = (None, "SIGTERM", "SIGINT")
        flag = torch.tensor([float(codes.index(requested))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop_group)
        return codes[int(flag.item())]

    def run(self) -> dict:
        """Train to `train.steps`: log, evaluate and checkpoint on the configured steps; stop
        with a checkpoint on SIGTERM or Ctrl-C (every rank after the same step) or when the run
        diverged."""
        t = self.cfg.train
        writer = MetricsWriter(self.files, self.is_main, self.cfg.logging.tensorboard,
                               self.cfg.logging.jsonl, self.cfg.logging.progress, t.steps,
                               self.step)
        self.last_val = None
        self.spikes = SpikeDetector()
        self.meter = _Throughput(time.perf_counter())
        watchdog = HangWatchdog(t.collective_timeout_s)
        stop = StopSignal(grace_s=min(60.0, t.collective_timeout_s),
                          say=lambda line: os.write(2, (line + "\n").encode()) if self.is_main
                          else None)  # os.write: print in a signal handler may reenter stderr
        stopped = None
        try:
            while self.step < t.steps:
                watchdog.arm()  # a step (and its collectives) hung longer than this: dump, exit 1
                out = self.train_step(self.step)
                self.step += 1
                self.meter.tokens += self.tokens_per_step
                self._after_step(out, writer)
                stopped = self._agreed_stop(stop.requested)
                if self._checkpoint_policy(stopped, writer):
                    break
        finally:
            watchdog.disarm()
            stop.restore()
            self._close(writer)
        return self._summary(stopped)

    def _after_step(self, out: StepResult, writer: MetricsWriter) -> None:
        """Spike and skip reports, metrics on logging steps, evaluation on evaluation steps; a
        diverged run (train.max_skipped_steps non-finite steps in a row) stops here."""
        t = self.cfg.train
        z = self.spikes.update(out.loss)
        if z is not None:
            ids = out.sample_ids
            writer.message(f"warning: loss spike at step {self.step}: loss {out.loss:.4f} is "
                           f"{z:.1f} standard deviations above the last "
                           f"{len(self.spikes.losses)} steps; rank {self.env.rank}'s samples: "
                           f"{ids[:16]}{' ...' if len(ids) > 16 else ''}")
        if out.skipped:
            self.consecutive_skips += 1
            self.skipped_total += 1
            writer.message(f"step {self.step}: non-finite loss or gradient norm (loss {out.loss}, "
                           f"grad norm {out.grad_norm}); optimizer step skipped")
        else:
            self.consecutive_skips = 0
        diverged = self.consecutive_skips >= t.max_skipped_steps
        if self.step % t.log_every == 0 or self.step == t.steps or diverged:
            self._log_metrics(out, writer)
        if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
            self.last_val = self.evaluate()
            writer.log("eval", {"step": self.step, "tokens": self.step * self.tokens_per_step,
                                "val_loss": self.last_val})
            writer.message(f"step {self.step}: validation loss {self.last_val:.4f}")
        if diverged:
            self.save_checkpoint(final=True)
            raise RunError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"norm (train.max_skipped_steps={t.max_skipped_steps}); stopped after saving "
                f"step {self.step}, marked diverged; a rerun resumes from "
                f"{self.last_good_checkpoint()}")

    def _log_metrics(self, out: StepResult, writer: MetricsWriter) -> None:
        """One metrics.jsonl record (and TensorBoard scalars, the progress line)."""
        t = self.cfg.train
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tps = self.meter.tokens_per_s(time.perf_counter())
        rec = {"step": self.step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
               "tokens": self.step * self.tokens_per_step, "tokens_per_s": tps,
               "peak_memory_gib": peak_memory_gib(self.device),
               "skipped_steps": self.skipped_total}
        if self.peak_flops:
            world = dist.get_world_size() if dist.is_initialized() else 1
            rec["mfu"] = self.flops_per_token * tps / (self.peak_flops * world)
        moe_rec, moe_hist = out.moe_metrics()  # read from the device here, on logging steps
        if moe_rec:
            rec.update(moe_rec, moe_aux_loss=float(out.moe_aux_loss))
        writer.log("metrics", rec, moe_hist)
        writer.progress(self.step, f"loss {out.loss:.3f} lr {out.lr:.2e} {tps:,.0f} tok/s")
        if writer.bar is None:
            writer.message(f"step {self.step}/{t.steps} loss {out.loss:.4f} lr {out.lr:.2e} "
                           f"grad_norm {out.grad_norm:.3f} {tps:,.0f} tok/s")

    def _checkpoint_policy(self, stopped: str | None, writer: MetricsWriter) -> bool:
        """Save on the last step, on a stop request and every `checkpoint.every` steps; True
        when the run stops here."""
        every = self.cfg.checkpoint.every
        if stopped or self.step == self.cfg.train.steps:
            self.save_checkpoint(final=True)
        elif every and self.step % every == 0:
            self.save_checkpoint(writer=writer)
        return bool(stopped)  # cli.py says so in one line: "stopped by ... at step N; ..."

    def _close(self, writer: MetricsWriter) -> None:
        """Also on an error: a background save in flight is finished, the writer closed."""
        try:
            if self.saver is not None:
                self.finish_async_save(writer)
        finally:
            if self.saver is not None:
                self.saver.close()
            writer.close()

    def _summary(self, stopped: str | None) -> dict:
        summary = {"steps": self.step, "tokens": self.step * self.tokens_per_step,
                   "n_params": self.n_params, "n_params_nonembedding": self.n_params_nonemb,
                   "flops_per_token": self.flops_per_token, "final_val_loss": self.last_val,
                   "skipped_steps": self.skipped_total}
        if stopped:
            return {**summary, "stopped": stopped}
        if self.is_main:
            self.files.write_text("summary.json", json.dumps(summary, indent=1))
        return summary


class _Throughput:
    """Tokens per second since the last logged step."""

    def __init__(self, now: float):
        self.since, self.tokens = now, 0

    def tokens_per_s(self, now: float) -> float:
        tps = self.tokens / max(now - self.since, 1e-9)
        self.since, self.tokens = now, 0
        return tps


def finished(cfg: Config) -> dict | None:
    """The summary of a run that already reached `train.steps` (its checkpoint to resume from is
    at or past it), else None: a rerun of a finished run changes no file."""
    resume = ckpt.find_resume(cfg, log=lambda m: None)
    if resume is None:
        return None
    meta = ckpt.read_meta(resume)
    step = meta.get("step", 0)
    if step < cfg.train.steps or meta.get("config_hash") != ckpt.config_hash(cfg):
        return None  # more to train, or another run's checkpoint (the Trainer refuses it)
    try:
        summary = json.loads((Path(cfg.logging.run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return {**(summary if isinstance(summary, dict) else {}), "steps": step,
            "finished": str(resume)}


def train(cfg: Config, overwrite: bool = False, log=print) -> dict:
    done = finished(cfg)
    if done is not None:
        return done
    lock = RunDirLock(cfg.logging.run_dir) if DistEnv.from_environ().rank == 0 \
        else contextlib.nullcontext()
    with lock:
        try:
            return Trainer(cfg, overwrite=overwrite, log=log).run()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
