"""Training of the synthetic retrieval experiments: a bank of runs trains in lockstep (one Adam over the stacked
parameters), is evaluated on fresh sequences with every query, and each run stops by the paper's rules; finished runs
are dropped from the bank (`compact`) and their results appended to results.csv / curves.csv as they end.
"""

from __future__ import annotations

import csv
import math
import os
import time
import zlib
from dataclasses import dataclass

import torch

from .models import D_KEY, RunBank, per_run_loss
from .task import latest_values, sample_queries, sample_sequences

STOP_LOSS = 0.001  # stop when the evaluation loss reaches this
MAX_STRIKES = 10  # ... or after more than this many evaluations without improvement (official: strike > 10)
RESULT_FIELDS = ["setting", "model", "rule", "S", "L", "seed", "final_eval_loss", "best_eval_loss", "steps",
                 "stop_reason", "seconds"]
CURVE_FIELDS = ["setting", "model", "rule", "S", "seed", "step", "eval_loss"]


@dataclass
class Config:
    device: str
    backend: str
    chunk_size: int
    lr: float
    batch_size: int
    max_steps: int
    eval_every: int
    eval_sequences: int
    bucket_size: int
    time_budget: float
    patience: int = MAX_STRIKES


def sample_bank_batch(bank, batch, generator, all_queries):
    """Sequences for every S in the bank (runs with the same S share them).

    Returns keys, values [R, B, L_pad], query ids [R, B|1, J], targets [R, B, J]: J = 1 (one random query per
    sequence, training) or J = S_pad (every key that occurs in the sequence, evaluation)."""
    keys, values = sample_sequences(batch, bank.data_sizes, bank.data_lengths, bank.replace, generator, bank.device)
    table = latest_values(keys, values, bank.s_pad)  # padding keys (= S_pad) are ignored
    index = bank.data_index
    if all_queries:
        query_ids = torch.arange(bank.s_pad, device=bank.device).expand(len(bank.specs), 1, -1)
        targets = table[index]
    else:
        queries, targets = sample_queries(keys, table, bank.data_lengths, generator)
        query_ids, targets = queries[index], targets[index]
    return keys.clamp(max=bank.s_pad - 1)[index], values[index], query_ids, targets


def bank_loss(bank, keys, values, query_ids, targets):
    """Per-run loss [R] for query_ids [R, B|1, J]."""
    count, qb, j = query_ids.shape
    q_pre = bank.query_inputs(query_ids.reshape(count, qb * j)).view(count, qb, j, D_KEY)
    return per_run_loss(bank.retrieve(keys, values, q_pre), targets)


@torch.no_grad()
def evaluate(bank, generator, num_sequences):
    bank.redraw()  # one random matrix for the whole evaluation
    keys, values, query_ids, targets = sample_bank_batch(bank, num_sequences, generator, all_queries=True)
    return bank_loss(bank, keys, values, query_ids, targets)


@dataclass
class RunStatus:
    best: float = math.inf
    last: float = math.nan
    strikes: int = 0
    steps: int = 0
    reason: str = ""
    seconds: float = 0.0


class ResultWriter:
    """Appends to results.csv / curves.csv as runs progress, so a cut-off run keeps what it finished."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.results_path = os.path.join(out_dir, "results.csv")
        self.curves_path = os.path.join(out_dir, "curves.csv")
        for path, fields in ((self.results_path, RESULT_FIELDS), (self.curves_path, CURVE_FIELDS)):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(fields)

    def _append(self, path, rows):
        with open(path, "a", newline="") as f:
            csv.writer(f).writerows(rows)

    def curve(self, rows):
        self._append(self.curves_path, rows)

    def result(self, spec, status):
        self._append(self.results_path, [[spec.setting, spec.model, spec.rule, spec.S, spec.length, spec.seed,
                                          f"{status.last:.6g}", f"{status.best:.6g}", status.steps, status.reason,
                                          f"{status.seconds:.1f}"]])


def make_optimizer(params, lr, device):
    fused = str(device).startswith("cuda")  # one kernel for all parameters instead of several per parameter
    return torch.optim.Adam(list(params.values()), lr=lr, fused=fused or None)


def train_bank(specs, cfg, writer, deadline, log=print):
    """Trains the runs `specs` in lockstep until each meets its stopping rule, the step cap or the deadline."""
    bank = RunBank(specs, cfg.device, backend=cfg.backend, chunk_size=cfg.chunk_size)
    optimizer = make_optimizer(bank.params, cfg.lr, cfg.device)
    seed = zlib.crc32(repr([s.key() for s in bank.specs]).encode())
    train_gen = torch.Generator(device=cfg.device).manual_seed(seed)
    eval_gen = torch.Generator(device=cfg.device).manual_seed(seed + 1)
    status = {s.key(): RunStatus() for s in specs}
    start = time.time()
    for step in range(1, cfg.max_steps + 1):
        bank.redraw()
        losses = bank_loss(bank, *sample_bank_batch(bank, cfg.batch_size, train_gen, all_queries=False))
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # runs share no parameters, so each gets exactly its own gradient
        optimizer.step()
        if step % cfg.eval_every:
            continue
        eval_losses = evaluate(bank, eval_gen, cfg.eval_sequences).tolist()
        elapsed = time.time() - start
        out_of_time = time.time() > deadline
        finished, curve_rows = [], []
        for spec, loss in zip(bank.specs, eval_losses):
            st = status[spec.key()]
            if st.reason:  # finished earlier, still in the bank until the next compaction
                continue
            st.last, st.steps, st.seconds = loss, step, elapsed
            curve_rows.append([spec.setting, spec.model, spec.rule, spec.S, spec.seed, step, f"{loss:.6g}"])
            if loss < st.best:
                st.best, st.strikes = loss, 0
            else:
                st.strikes += 1
            if not math.isfinite(loss):
                st.reason = "nan"
            elif loss <= STOP_LOSS:
                st.reason = "solved"
            elif st.strikes > cfg.patience:
                st.reason = "no_progress"
            elif step + cfg.eval_every > cfg.max_steps:
                st.reason = "step_cap"
            elif out_of_time:
                st.reason = "time_budget"
            if st.reason:
                finished.append(spec)
                writer.result(spec, st)
        writer.curve(curve_rows)
        active = [i for i, s in enumerate(bank.specs) if not status[s.key()].reason]
        if finished:
            log(f"  step {step:5d} ({elapsed:6.1f}s): " + ", ".join(
                f"{s.model}/{s.rule}/S={s.S}:{status[s.key()].last:.4f}({status[s.key()].reason})" for s in finished),
                flush=True)
        if not active:
            break
        if len(active) <= len(bank.specs) // 2:  # drop finished runs so they stop costing compute
            bank, optimizer = compact(bank, optimizer, active, cfg.lr, cfg.device)
    return [status[s.key()] for s in specs]


def compact(bank, optimizer, keep, lr, device="cpu"):
    """Drops finished runs: a smaller bank, and an Adam whose moments are the kept runs' moments."""
    new_bank = bank.select(keep)
    new_optimizer = make_optimizer(new_bank.params, lr, device)
    index = torch.tensor(keep, device=bank.device)
    for name, new_p in new_bank.params.items():
        state = optimizer.state.get(bank.params[name])
        if state:  # absent for parameters that never had a gradient (W_beta in a bank without delta runs)
            new_optimizer.state[new_p] = {
                key: value.clone() if value.dim() == 0 else new_bank.copy_block(value[index], name, bank)
                for key, value in state.items()}
    return new_bank, new_optimizer

