#!/usr/bin/env python
"""Mutation testing for this project: put one chosen one-line bug at a time into a copy of the repository and check
that the tests meant to catch it fail (issue 16: one-line bugs went unnoticed because the tests compared backends
with each other and checked the training script by its flags).

    python scripts/checks/mutation_test.py --subset ci  # 14 mutants over 12 files, ~4 minutes on 2 busy cores (CI)
    python scripts/checks/mutation_test.py --all        # every mutant below, ~17 minutes
    python scripts/checks/mutation_test.py --only beta_tanh rotary_sign_flipped
    python scripts/checks/mutation_test.py --list       # the mutants, their tests, and whether each pattern matches

Every mutant names the file, the exact source text it changes (which must occur exactly once: a pattern that no
longer matches, or matches twice, fails the run before anything is tested, so the list cannot silently rot), the
replacement, the tests that must catch it, and why it is a bug. All patterns are checked in every mode. The tests
run in a copy of the working tree (tracked and untracked files that git does not ignore) with PYTHONPATH pointing at
the copy's package, `pytest -x -q`, OMP_NUM_THREADS=1 and a timeout per mutant; a guard plugin stops a run whose
`modeling_fwp` would not be the copy's (the package is also installed in editable mode) or whose mutated file does
not hold the mutant. The unmutated copy runs the union of the selected tests first (the baseline): a red baseline
would make every mutant look killed.

Exit status: 0 every mutant killed; 1 a mutant survived (or a selection ran no test); 2 a stale pattern or a bad
entry in the list; 3 the baseline failed; 4 the copy was not isolated.

Why not mutmut or cosmic-ray (both on PyPI; mutmut 3.8 and cosmic-ray 8 were looked at):
- They generate mutants mechanically (operator swaps, constants, every line of every function), thousands for this
  package; each needs a test run, and a run here pays ~10 s just importing torch and transformers on a 2-core
  machine shared with other jobs. Most generated mutants are noise (log messages, error texts, equivalent rewrites of
  shape arithmetic) and the bugs that matter here (a DPFP shift off by one, a loss normalised per micro-batch, an
  Auto-class registration dropped) are semantic, not operator swaps. A curated list of ~60 chosen bugs, each with
  the few tests that must catch it, runs in minutes and documents what each test is for.
- mutmut 3 mutates only inside functions and runs the tests through a trampoline in a rewritten copy of the source
  ("mutants/"); this package's module-level code (the Auto-class registrations in __init__.py, CACHE_NAME in
  compat.py) cannot be mutated, and the rewritten files are what save_pretrained would copy next to the weights for
  trust_remote_code, so remote-code tests would test the trampolines. Triton kernels (@triton.jit source) cannot be
  rewritten either. cosmic-ray needs a session database, a config per test command and per-module runs.
- Neither checks that a hand-picked bug still applies after the code changes; here a stale pattern is an error.
So a runner of ~250 lines (besides the list) with no dependency is simpler and faster for this project; the tools
remain useful for a one-off broad sweep (e.g. `mutmut run` over losses.py) to find candidates for this list.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # scripts/checks/ -> the repository root


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str  # relative to the repository root
    find: str  # exact source text; must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # test files or node ids under tests/
    why: str  # the bug, in one line
    ci: bool = False  # part of --subset ci


REF = "tests/test_reference_model.py::test_logits_equal_reference"
EFFECTS = "tests/test_training_effects.py"

MUTATIONS = [
    # ------------------------------------------------------------------ the six maths bugs (test_reference_model.py)
    Mutation("dpfp_shift_off_by_one", "modeling_fwp/feature_maps.py",
             "for j in range(1, self.nu + 1)", "for j in range(self.nu)",
             (f"{REF}[feature_map=dpfp2-recurrent]",),
             "DPFP multiplies r by its cyclic shifts 0..nu-1 instead of 1..nu (shift 0 gives r^2)", ci=True),
    Mutation("favor_without_half_sq_norm", "modeling_fwp/feature_maps.py",
             "torch.cat([torch.exp(u - half_sq_norm), torch.exp(-u - half_sq_norm)], dim=-1)",
             "torch.cat([torch.exp(u), torch.exp(-u)], dim=-1)",
             (f"{REF}[feature_map=favor-recurrent]",),
             "FAVOR+ features without the exp(-|x|^2/2) factor"),
    Mutation("attention_norm_retrieval_uses_z_t", "modeling_fwp/modeling_fwp.py",
             "k_den = reads[:, :, heads:, 0].to(acc) - (k.to(acc) ** 2).sum(-1)",
             "k_den = reads[:, :, heads:, 0].to(acc)",
             (f"{REF}[attention_normalization=True-recurrent]",),
             "the delta rule's normalised retrieval divides by z_t . k_t instead of z_{t-1} . k_t"),
    Mutation("beta_tanh", "modeling_fwp/modeling_fwp.py",
             "beta = torch.sigmoid(beta_logits.to(acc))", "beta = torch.tanh(beta_logits.to(acc))",
             (f"{REF}[use_short_conv=True-recurrent]",),
             "the learning rate beta through tanh (can be negative) instead of sigmoid", ci=True),
    Mutation("rotary_sign_flipped", "modeling_fwp/sequence_layout.py",
             "torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)",
             "torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)",
             (f"{REF}[position_embedding=rotary-recurrent]",),
             "rotary embedding rotates the wrong way"),
    Mutation("favor_redraw_same_matrix", "modeling_fwp/modeling_fwp.py",
             "manual_seed(1_000_003 * self._favor_draws + layer.attn.layer_idx)",
             "manual_seed(layer.attn.layer_idx)",
             ("tests/test_reference_model.py::test_favor_redraws_each_training_step_and_uses_the_drawn_matrix"
              "[recurrent]",),
             "every FAVOR+ redraw draws the same matrix (the seed ignores the draw counter)"),
    # ---------------------------------------------------------------- the four plumbing bugs (test_training_effects)
    Mutation("packing_ignored", "scripts/train.py",
             "    if data_args.packing:\n", "    if False:  # --packing ignored\n",
             (f"{EFFECTS}::test_packing_gives_each_document_the_logits_and_loss_it_gets_alone",),
             "train.py ignores --packing: documents share fixed blocks and see each other", ci=True),
    Mutation("carry_state_loss_not_divided_by_num_items", "scripts/train.py",
             "if num_items_in_batch is not None:  # normalised over the whole accumulated (and gathered) batch",
             "if False:  # normalised per micro-batch",
             (f"{EFFECTS}::test_accumulated_carry_state_gradients_equal_one_big_batch",
              f"{EFFECTS}::test_accumulated_gradients_with_carried_state_equal_truncated_backprop"),
             "FWPTrainer (carry_state) skips the division by num_items_in_batch: each micro-batch's mean counts the "
             "same however many tokens it scores", ci=True),
    Mutation("carry_state_loss_summed", "scripts/train.py",
             "loss = nll / num_items_in_batch", "loss = nll",
             (f"{EFFECTS}::test_accumulated_carry_state_gradients_equal_one_big_batch",),
             "FWPTrainer (carry_state) returns the summed NLL: gradients scale with the number of tokens"),
    Mutation("ddp_rescale_skipped", "scripts/train.py",
             "loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes",
             "loss = loss  # rescale skipped",
             (f"{EFFECTS}::test_two_gloo_processes_give_the_gradients_of_one_process_on_the_combined_batch",),
             "the carry-state loss is not multiplied by the number of processes: DDP's average halves the gradient",
             ci=True),
    Mutation("automodel_not_registered", "modeling_fwp/__init__.py",
             'FWPModel.register_for_auto_class("AutoModel")', "pass  # AutoModel not registered",
             (f"{EFFECTS}::test_saved_base_model_loads_through_automodel_from_its_own_code",),
             "a saved FWPModel's config.json lacks auto_map['AutoModel']: it does not load with trust_remote_code",
             ci=True),
    # -------------------------------------------------------------------------------------------- modeling_fwp.py
    Mutation("packed_positions_do_not_restart", "modeling_fwp/sequence_layout.py",
             "offsets = torch.arange(seq_len, device=device) - cu_seqlens[:-1].long()[seq_index]",
             "offsets = torch.arange(seq_len, device=device)",
             ("tests/test_data.py::test_packed_batch_loss_equals_per_document_losses",),
             "positions of packed documents count from the row start, not from each document's start"),
    Mutation("position_ids_boundary_off_by_one", "modeling_fwp/sequence_layout.py",
             "starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1",
             "starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten()",
             ("tests/test_data.py::test_packed_batch_loss_equals_per_document_losses[position_ids]",),
             "documents found from restarting position_ids start one token early"),
    Mutation("padded_positions_off_by_one", "modeling_fwp/sequence_layout.py",
             "torch.cumsum(mask.long(), dim=1) - 1).flatten()", "torch.cumsum(mask.long(), dim=1)).flatten()",
             ("tests/test_reference_model.py::test_left_padded_rows_equal_reference_of_each_row_alone"
              "[delta_attn_norm_rotary-recurrent]",),
             "under a padding mask the first real token gets position 1"),
    Mutation("readout_scaled_by_key_dim", "modeling_fwp/modeling_fwp.py",
             "scale = self.head_dim ** -0.5", "scale = q.shape[-1] ** -0.5",
             (f"{REF}[feature_map=dpfp2-recurrent]",),
             "the read-out is scaled by phi's size instead of 1/sqrt(d_head) (differs for DPFP and FAVOR+)"),
    Mutation("cache_never_read", "modeling_fwp/modeling_fwp.py",
             "state = past_key_values[idx] if past_key_values is not None else None", "state = None",
             ("tests/test_generation.py::test_greedy_generate_equals_argmax_loop_without_cache[delta_net]",),
             "every forward starts from an empty state: decoding forgets the prompt"),
    Mutation("post_ln_residual_dropped", "modeling_fwp/modeling_fwp.py",
             "hidden = self.attn_norm(hidden + self.dropout(out))", "hidden = self.attn_norm(self.dropout(out))",
             (f"{REF}[use_short_conv=True-recurrent]",),
             "post-LN block without the residual around the fast weight layer"),
    Mutation("model_loss_ignores_num_items", "modeling_fwp/modeling_fwp.py",
             "loss = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)",
             "loss = causal_lm_loss(logits, labels, shift_labels=shift_labels)",
             ("tests/test_model.py::test_num_items_in_batch_makes_gradient_accumulation_exact",),
             "FWPForCausalLM drops num_items_in_batch: gradient accumulation over uneven micro-batches is inexact"),
    Mutation("favor_redraws_in_eval", "modeling_fwp/modeling_fwp.py",
             "if self.training and torch.is_grad_enabled() and self.config.feature_map == \"favor\"",
             "if torch.is_grad_enabled() and self.config.feature_map == \"favor\"",
             ("tests/test_reference_model.py::test_favor_matrix_stays_fixed_in_eval_without_gradients_and_with_"
              "redraw_off",),
             "FAVOR+ redraws its matrix in eval too: evaluation is not reproducible"),
    # ------------------------------------------------------------------------------------------------------ ops.py
    Mutation("delta_rule_without_retrieval", "modeling_fwp/ops.py",
             "write = beta[:, t, :, None] * (v_t - retrieved)", "write = beta[:, t, :, None] * v_t",
             ("tests/test_ops.py::test_reference_against_hand_computation",
              "tests/test_ops.py::test_delta_rule_overwrites_a_stored_association"),
             "the reference delta rule writes beta v instead of beta (v - S^T k): a scaled sum rule", ci=True),
    Mutation("default_scale_one", "modeling_fwp/ops.py",
             "        return key_dim**-0.5\n", "        return 1.0\n",
             ("tests/test_ops.py::test_explicit_scale_is_applied_to_output",),
             "ops' default read-out scale is 1 instead of K^-0.5"),
    # ------------------------------------------------------------------------------------------------ ops_chunk.py
    Mutation("chunk_scores_without_diagonal", "modeling_fwp/ops_chunk.py",
             "scores = torch.bmm(flat_q, flat_k.transpose(-1, -2)).tril_()  # causal, diagonal included",
             "scores = torch.bmm(flat_q, flat_k.transpose(-1, -2)).tril_(-1)",
             ("tests/test_ops.py::test_backend_matches_recurrent[zero_state-K32V16-63-delta-chunk]",
              "tests/test_ops.py::test_backend_matches_recurrent[initial_state-K48V8-200-delta-chunk]"),
             "chunkwise delta rule reads before its own write inside a chunk", ci=True),
    Mutation("chunk_dv_without_beta", "modeling_fwp/ops_chunk.py",
             "d_v = flat_d_residual.mul_(flat_beta[..., None])", "d_v = flat_d_residual",
             ("tests/test_ops.py::test_chunk_backward_gradcheck",),
             "hand-written chunk backward forgets beta in dL/dv"),
    Mutation("sum_chunk_sees_its_own_chunk_total", "modeling_fwp/ops_chunk.py",
             "states = torch.cat([torch.zeros_like(totals[:1]), totals[:-1]])", "states = totals",
             ("tests/test_ops.py::test_backend_matches_recurrent[zero_state-K32V16-63-sum-chunk]",
              "tests/test_ops.py::test_backend_matches_recurrent[initial_state-K48V8-200-sum-chunk]"),
             "chunked sum rule: every token reads its whole chunk's writes (the future)"),
    Mutation("unit_lower_inverse_one_step_short", "modeling_fwp/ops_chunk.py",
             "    for j in range(block - 1):", "    for j in range(block - 2):",
             ("tests/test_ops.py::test_unit_lower_inverse_matches_dense_inverse",
              "tests/test_ops.py::test_unit_lower_inverse_fp32_with_identical_keys"),
             "(I + A)^-1 of the diagonal blocks skips the last substitution step: not an exact inverse"),
    # ------------------------------------------------------------------------------------------------ cache_fwp.py
    Mutation("row_tokens_not_accumulated", "modeling_fwp/cache_fwp.py",
             "layer.row_tokens = new_row_tokens if layer.row_tokens is None else layer.row_tokens + new_row_tokens",
             "layer.row_tokens = new_row_tokens",
             ("tests/test_generation.py::test_generate_continues_a_previous_generate_exactly[conv_rotary_prenorm]",),
             "the cache forgets how many tokens each row had seen before a forward: positions restart", ci=True),
    Mutation("detached_cache_keeps_graph", "modeling_fwp/cache_fwp.py",
             "else source.fast_weights.detach()", "else source.fast_weights",
             ("tests/test_model.py::test_carried_segments_equal_one_long_forward",
              "tests/test_model.py::test_carried_state_is_detached_in_training"),
             "FWPCache.detach keeps the fast weights in the graph (truncated backprop is not truncated)"),
    Mutation("reorder_cache_noop", "modeling_fwp/cache_fwp.py",
             "layer.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))", "layer.map_rows(lambda t: t)",
             ("tests/test_generation.py::test_reorder_repeat_and_select_rows[conv_rotary_prenorm]",),
             "beam search reorders the beams but not their states"),
    # ----------------------------------------------------------------------------------------- configuration_fwp.py
    Mutation("dpfp_key_dim_halved", "modeling_fwp/configuration_fwp.py",
             "return 2 * self.head_dim * self.dpfp_nu", "return self.head_dim * self.dpfp_nu",
             ("tests/test_config.py::test_key_dim_follows_the_feature_map",),
             "config.key_dim for DPFP misses the factor 2 of [relu(x), relu(-x)]", ci=True),
    Mutation("choices_not_validated", "modeling_fwp/configuration_fwp.py",
             "            if type(value) is not type(allowed[0]) or value not in allowed:  # 64.0 and True are no chunk sizes\n",
             "            if False:\n",
             ("tests/test_config.py::test_bad_values_name_the_field",),
             "FWPConfig accepts any update_rule / feature_map / ... value"),
    Mutation("output_norm_default_off", "modeling_fwp/configuration_fwp.py",
             'self.use_output_norm = self.block_style == "pre_norm"', "self.use_output_norm = False",
             ("tests/test_config.py", f"{EFFECTS}::test_a_pre_norm_override_builds_the_documented_modern_blocks"),
             "pre_norm blocks default to no output norm (the docstring says they default to it on)"),
    # ------------------------------------------------------------------------------------------------------ losses
    Mutation("loss_gradient_without_onehot", "modeling_fwp/losses.py",
             "probs.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(lse[rows, None]))", "pass",
             ("tests/test_losses.py::test_loss_and_gradient_equal_the_definition_in_float64",),
             "the chunked cross-entropy's backward is softmax instead of softmax - onehot", ci=True),
    Mutation("loss_counts_ignored_targets", "modeling_fwp/losses.py",
             "total += ((lse[rows] - picked) * valid[rows]).sum()", "total += (lse[rows] - picked).sum()",
             ("tests/test_losses.py",),
             "targets of -100 are scored (against token 0)"),
    Mutation("loss_labels_not_shifted", "modeling_fwp/losses.py",
             "targets[:, :-1] = labels[:, 1:]", "targets[:, :-1] = labels[:, :-1]",
             ("tests/test_losses.py::test_same_semantics_as_transformers_loss",),
             "each position is trained to predict its own token instead of the next one"),
    Mutation("all_ignored_labels_nan", "modeling_fwp/losses.py",
             "return total / (num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) "
             "else max(num_items_in_batch, 1))",
             "return total / num_items_in_batch",
             ("tests/test_bad_input.py::test_all_ignored_labels_give_zero_loss_and_keep_the_weights_finite",),
             "a batch whose labels are all -100 gives loss 0/0 = NaN"),
    # ----------------------------------------------------------------------------------------------------- presets
    Mutation("overrides_not_parsed_as_json", "modeling_fwp/presets.py",
             "overrides[key.strip()] = json.loads(raw)", "overrides[key.strip()] = raw",
             (f"{EFFECTS}::test_packing_gives_each_document_the_logits_and_loss_it_gets_alone",),
             "--config_overrides values stay strings (hidden_size='32')"),
    Mutation("load_preset_accepts_unknown_overrides", "modeling_fwp/presets.py",
             '    check_field_names(overrides, "load_preset")\n', "",
             ("tests/test_bad_input.py::test_load_preset_refuses_an_unknown_override",),
             "load_preset silently keeps a misspelt override", ci=True),
    Mutation("configuration_dir_ignores_the_wheel", "modeling_fwp/presets.py",
             'return installed if installed.is_dir() else package.parent / "configuration"',
             'return package.parent / "configuration"',
             ("tests/test_packaging.py",),
             "an installed wheel looks for presets beside site-packages/modeling_fwp instead of inside it"),
    # -------------------------------------------------------------------------------------------------------- data
    Mutation("pieces_overlap", "modeling_fwp/data.py",
             "for i in range(0, len(doc), block_size)]", "for i in range(0, len(doc), block_size - 1)]",
             ("tests/test_data.py::test_blocks_and_pieces",),
             "packing pieces overlap by one token (tokens trained twice)"),
    Mutation("streams_targets_not_shifted", "modeling_fwp/data.py",
             "inputs, targets = segments(0), segments(1)", "inputs, targets = segments(0), segments(0)",
             ("tests/test_data.py::test_contiguous_streams_keep_each_row_on_its_stream",),
             "carry-state streams score each token against itself", ci=True),
    Mutation("validation_is_training_data", "modeling_fwp/data.py",
             'raw["train"], raw["validation"] = parts["train"], parts["test"]',
             'raw["train"], raw["validation"] = parts["train"], parts["train"]',
             ("tests/test_data.py::test_local_files_whole_documents_and_held_out_validation",),
             "the held-out validation split is the training split"),
    Mutation("unigram_without_smoothing", "modeling_fwp/data.py",
             ".astype(np.float64) + 1.0", ".astype(np.float64)",
             ("tests/test_data.py::test_unigram_perplexity",),
             "the unigram baseline has no add-one smoothing"),
    Mutation("documents_without_eos", "modeling_fwp/data.py",
             "eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []", "eos = []",
             (f"{EFFECTS}::test_packing_gives_each_document_the_logits_and_loss_it_gets_alone",),
             "documents are not ended by EOS: the model never learns where a document ends"),
    # ------------------------------------------------------------------------------------------- tokenizer_utils
    Mutation("tokenizer_pad_is_eos", "modeling_fwp/tokenizer_utils.py",
             "pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)",
             "pad_token=BOS_EOS_TOKEN, clean_up_tokenization_spaces=False)",
             ("tests/test_data.py::test_tokenizer_trained_cached_and_reused",),
             "the byte-level BPE pads with EOS (pads then read as document ends)", ci=True),
    Mutation("tokenizer_cache_ignores_text", "modeling_fwp/tokenizer_utils.py",
             'digest.update(text.encode("utf-8"))', "pass",
             ("tests/test_data.py::test_tokenizer_trained_cached_and_reused",
              f"{EFFECTS}::test_another_corpus_or_vocabulary_size_trains_its_own_tokenizer"),
             "the tokenizer cache key ignores the training text: another corpus reuses a foreign vocabulary"),
    Mutation("tokenizer_cache_ignores_vocab_size", "modeling_fwp/tokenizer_utils.py",
             '-{digest.hexdigest()[:16]}-v{vocab_size}"', '-{digest.hexdigest()[:16]}"',
             ("tests/test_data.py::test_tokenizer_trained_cached_and_reused",
              f"{EFFECTS}::test_another_corpus_or_vocabulary_size_trains_its_own_tokenizer"),
             "the tokenizer cache key ignores vocab_size: another size reuses a tokenizer of the wrong size"),
    Mutation("vocab_fit_off_by_one", "modeling_fwp/tokenizer_utils.py",
             "    if size > vocab_size:\n", "    if size > vocab_size + 1:\n",
             ("tests/test_data.py::test_tokenizer_trained_cached_and_reused",),
             "a tokenizer one token larger than the embedding is accepted"),
    # ------------------------------------------------------------------------------------------------------ compat
    Mutation("cache_name_always_old", "modeling_fwp/compat.py",
             'CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} '
             'else "past_key_values"',
             'CACHE_NAME = "past_key_values"',
             ("tests/test_transformers_versions.py",),
             "the cache goes under the pre-5.24 name on every release (5.24 warns, generate() loses the state)"),
    Mutation("chunked_prefill_cut_on_every_release", "modeling_fwp/compat.py",
             "CHUNKED_PREFILL_REFEEDS_HISTORY = TRANSFORMERS_VERSION < (5, 23)",
             "CHUNKED_PREFILL_REFEEDS_HISTORY = True",
             ("tests/test_generation.py::test_prefill_chunk_size_in_generation_config",
              "tests/test_generation.py::test_generate_continues_a_previous_generate_exactly",
              "tests/test_generation.py::test_multi_turn_continuation_of_a_left_padded_batch"),
             "the pre-5.23 chunked-prefill workaround applied to releases that do not need it"),
    # ------------------------------------------------------------- Triton kernels, through the interpreter tests
    Mutation("triton_state_fwd_causal_without_diagonal", "modeling_fwp/ops_triton_forward.py",
             "    causal = r[:, None] >= r[None, :]\n    s0 = tl.zeros",
             "    causal = r[:, None] > r[None, :]\n    s0 = tl.zeros",
             ("tests/test_ops_triton.py::test_interpreter_matches_float64_loop",),
             "the Triton chunk kernel reads before its own write inside a chunk"),
    Mutation("triton_swiglu_sign", "modeling_fwp/norm_triton.py",
             "y = g / (1.0 + tl.exp(-g)) * u", "y = g / (1.0 + tl.exp(g)) * u",
             ("tests/test_norm_triton.py::test_interpreter_matches_float64_reference",),
             "the fused SwiGLU computes g * sigmoid(-g) * u"),
    Mutation("triton_l2_backward_renormalises_its_output", "modeling_fwp/norm_triton.py",
             "            if X_NORMED:\n                xhat = x\n",
             "            if X_NORMED:\n                xhat = x * rstd[:, None]\n",
             ("tests/test_norm_triton.py::test_interpreter_matches_float64_reference",),
             "the L2 norm's backward treats its saved output as the input and scales it by rstd again"),
    Mutation("triton_swiglu_linear_weight_grad_from_gate", "modeling_fwp/norm_triton.py",
             "dw = (dout2.t() @ hidden).to(weight.dtype)", "dw = (dout2.t() @ g2).to(weight.dtype)",
             ("tests/test_norm_triton.py::test_interpreter_matches_float64_reference",
              "tests/test_fused_model.py::test_interpreter_fused_model_equals_pytorch_model"),
             "the down projection's weight gradient uses gate instead of the recomputed SwiGLU output"),
    Mutation("triton_step_sum_rule_for_delta", "modeling_fwp/decode_triton.py",
             "            write = b * (v_row - retrieved)", "            write = b * v_row",
             ("tests/test_decode_triton.py::test_kernel_matches_the_float64_reference",
              "tests/test_decode_triton.py::test_captured_step_with_the_kernel_equals_the_full_forward"),
             "the captured decode step's Triton kernel writes beta v instead of the delta-rule correction"),
    Mutation("triton_loss_grad_without_onehot", "modeling_fwp/loss_triton.py",
             "d = tl.where(c == target, p - 1.0, p) * g", "d = p * g",
             ("tests/test_loss_triton.py::test_interpreter_matches_float64_reference",),
             "the fused loss's gradient is softmax alone, without subtracting the target's one-hot"),
    Mutation("joint_projection_beta_and_gate_swapped", "modeling_fwp/modeling_fwp.py",
             "        gate = parts.pop() if with_gate else None\n        beta = parts.pop() if with_beta else None",
             "        beta = parts.pop() if with_beta else None\n        gate = parts.pop() if with_gate else None",
             ("tests/test_static_cache.py::test_captured_generate_of_more_variants",),
             "the captured step splits the joint projection with beta's and the gate's rows swapped"),
    Mutation("triton_conv_without_silu", "modeling_fwp/conv_triton.py",
             "acc = acc * tl.sigmoid(acc)", "acc = acc",
             ("tests/test_conv_triton.py::test_interpreter_matches_reference",),
             "the fused short convolution drops its SiLU"),
    Mutation("triton_conv_row_stride_ignored", "modeling_fwp/conv_triton.py",
             "src.to(tl.int64)[:, None] * SX + cols", "src.to(tl.int64)[:, None] * C + cols",
             ("tests/test_conv_triton.py::test_interpreter_matches_reference",),
             "the short convolution reads a channel-slice input as if it were contiguous"),
    # -------------------------------------------------------------------------------------------- scripts/train.py
    Mutation("packing_collator_not_used", "scripts/train.py",
             "fwp_data.packing_collator(), streams[\"validation\"])", "default_data_collator, streams[\"validation\"])",
             (f"{EFFECTS}::test_packing_gives_each_document_the_logits_and_loss_it_gets_alone",),
             "packed pieces are collated as plain rows (no boundaries, no flattening)"),
    Mutation("carried_state_not_carried", "scripts/train.py",
             "if not self.carry_state or past_segment is None or segment != past_segment + 1:", "if True:",
             ("tests/test_train.py::test_carried_segments_equal_one_long_forward",),
             "--carry_state starts every segment from an empty state"),
    Mutation("carried_state_not_detached", "scripts/train.py",
             "(segment, output_cache(outputs).detach())", "(segment, output_cache(outputs))",
             ("tests/test_train.py::test_carried_segments_equal_one_long_forward",),
             "the carried state keeps the previous segment's graph"),
    Mutation("streams_shuffled", "scripts/train.py",
             "if self.carry_state:  # stream order is the point", "if False:  # stream order is the point",
             (f"{EFFECTS}::test_accumulated_gradients_with_carried_state_equal_truncated_backprop",),
             "carry-state batches are shuffled: a segment continues the state of a random other one"),
    Mutation("streams_laid_out_for_one_process", "scripts/train.py",
             "streams_per_process=batch, world_size=training_args.world_size,",
             "streams_per_process=batch, world_size=1,",
             (f"{EFFECTS}::test_two_gloo_processes_each_read_their_own_contiguous_streams",),
             "carry-state streams laid out for one process: under DDP a row jumps between streams"),
    Mutation("ddp_on_cpu_not_joined", "scripts/train.py",
             '        argv.append("--use_cpu=true")\n', "        pass\n",
             (f"{EFFECTS}::test_two_gloo_processes_give_the_gradients_of_one_process_on_the_combined_batch",),
             "several CPU processes without --use_cpu do not join over gloo (each trains alone)"),
    # ------------------------------------------------------------------ silently wrong input (issue 26)
    Mutation("additive_mask_read_as_0_1", "modeling_fwp/safeguards.py",
             "    if bool(other.any()):\n", "    if False:\n",
             ("tests/test_bad_input.py::test_an_additive_float_mask_is_refused",),
             "an additive float mask (0 / -inf) is read as a 0/1 mask: the padding is inverted"),
    Mutation("misspelt_keyword_swallowed", "modeling_fwp/safeguards.py",
             "    unknown = [key for key in kwargs if key not in TRANSFORMERS_KEYWORDS]\n", "    unknown = []\n",
             ("tests/test_bad_input.py::test_a_misspelled_keyword_is_refused",),
             "a misspelt keyword (atention_mask=) is swallowed by **kwargs and the model runs without it"),
    Mutation("fp32_triton_dots_in_tf32", "modeling_fwp/ops_triton_launch.py",
             'self.prec = "ieee" if v.dtype == torch.float32 else "tf32"', 'self.prec = "tf32"',
             ("tests/test_triton_precision.py",),
             "the fp32 Triton path asks for tf32 dot products (errors near 1e-3 on a GPU)"),
]

CI_TIMEOUT = 300


# ------------------------------------------------------------------------------------------------- the list itself

def problems_in_list(repo: Path, mutations=MUTATIONS) -> list[str]:
    """Everything that makes the list dishonest: stale or ambiguous patterns, no-op replacements, test files that do
    not exist, duplicate ids."""
    found, seen = [], set()
    for m in mutations:
        if m.id in seen:
            found.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        path = repo / m.file
        if not path.is_file():
            found.append(f"{m.id}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.find)
        if count != 1:
            found.append(f"{m.id}: the pattern occurs {count} times in {m.file} (must be exactly once): {m.find!r}")
        if m.find == m.replace:
            found.append(f"{m.id}: the replacement equals the pattern")
        if not m.tests:
            found.append(f"{m.id}: no tests")
        for arg in m.tests:  # node ids or files only, so the baseline can run their union
            if not arg.startswith("tests/") or not (repo / arg.split("::")[0]).is_file():
                found.append(f"{m.id}: {arg!r} is no test file or node id of an existing file under tests/")
    return found


def select(args) -> list[Mutation]:
    if args.only:
        by_id = {m.id: m for m in MUTATIONS}
        unknown = [i for i in args.only if i not in by_id]
        if unknown:
            raise SystemExit(f"unknown mutation id(s): {', '.join(unknown)}; see --list")
        return [by_id[i] for i in args.only]
    if args.subset == "ci":
        return [m for m in MUTATIONS if m.ci]
    return list(MUTATIONS)


def union_of_selections(mutations) -> list[str]:
    """Every test the mutants select, once: node ids inside a selected whole file are left to the file."""
    selected = list(dict.fromkeys(t for m in mutations for t in m.tests))
    files = {t for t in selected if "::" not in t}
    return [t for t in selected if "::" not in t or t.split("::")[0] not in files]


# ---------------------------------------------------------------------------------------------------- the copy

GUARD = '''"""pytest plugin written by scripts/checks/mutation_test.py: the run tests the copy, which holds the
mutant."""
import hashlib, importlib.util, os
from pathlib import Path

import pytest


def pytest_configure(config):
    root = Path(os.environ["MUTATION_ROOT"]).resolve()
    spec = importlib.util.find_spec("modeling_fwp")
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is None or root not in origin.parents:
        pytest.exit(f"modeling_fwp resolves to {origin}, not to the copy in {root}", returncode=98)
    name = os.environ.get("MUTATION_FILE")
    if name and hashlib.sha256((root / name).read_bytes()).hexdigest() != os.environ["MUTATION_SHA256"]:
        pytest.exit(f"{name} in the copy does not hold the mutant", returncode=99)
'''


def repository_files(repo: Path) -> list[str]:
    """The working tree as git sees it: tracked files that exist plus untracked files that are not ignored."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        return sorted({name for name in out.decode().split("\0") if name and (repo / name).is_file()})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "dist", "outputs", "runs", "__pycache__", ".pytest_cache"}
        return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(repo).parts))


def make_copy(repo: Path, work: Path) -> Path:
    copy = work / "repo"
    for name in repository_files(repo):
        if name.endswith(".whl"):
            continue
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    # PYTHONPATH gets a folder holding only the package (a link into the copy) and the guard, not the copy's root:
    # a wheel built from the copy (tests/test_packaging.py) writes modeling_fwp.egg-info there, which pip would then
    # take for an installed distribution.
    path = work / "pythonpath"
    path.mkdir()
    (path / "modeling_fwp").symlink_to(copy / "modeling_fwp", target_is_directory=True)
    (path / "_mutation_guard.py").write_text(GUARD)
    return copy


def run_pytest(copy: Path, work: Path, tests, label: str, timeout: float, mutated_file: str | None = None,
               stop_first: bool = True) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONDONTWRITEBYTECODE": "1", "MUTATION_ROOT": str(copy),
           "PYTHONPATH": os.pathsep.join(p for p in (str(work / "pythonpath"), os.environ.get("PYTHONPATH")) if p),
           "MODELING_FWP_CACHE": str(work / f"cache-{label}"), "HF_MODULES_CACHE": str(work / f"modules-{label}")}
    env.pop("MUTATION_FILE", None)
    if mutated_file:
        env["MUTATION_FILE"] = mutated_file
        env["MUTATION_SHA256"] = hashlib.sha256((copy / mutated_file).read_bytes()).hexdigest()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_mutation_guard",
               "--basetemp", str(work / f"tmp-{label}"), *(["-x"] if stop_first else []), *tests]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run's own process group (pytest and what it started)
        output, _ = proc.communicate()
        returncode = None
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    return {"returncode": returncode, "seconds": round(time.monotonic() - start, 1), "failed": failed,
            "tail": output[-2500:]}


def classify(result: dict) -> str:
    code = result["returncode"]
    if code is None:
        return "timeout"
    if code == 0:
        return "survived"
    if code in (1, 2, 3):  # tests failed, collection/import broken by the mutant, or an internal error
        return "killed"
    if code in (98, 99):
        return "not isolated"
    return "no tests ran"  # 4: usage error (a node id that no longer exists), 5: nothing collected


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--subset", choices=["ci"], help="the CI subset (14 mutants, a few minutes)")
    which.add_argument("--all", action="store_true", help="every mutant (the default)")
    which.add_argument("--only", nargs="+", metavar="ID", help="these mutants")
    which.add_argument("--list", action="store_true", help="list the mutants and check their patterns")
    parser.add_argument("--timeout", type=float, default=CI_TIMEOUT, help="seconds per mutant (default %(default)s)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument("--repo", type=Path, default=REPO, help="repository to copy (default: this one)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()

    problems = problems_in_list(repo)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.id:44s} {'ci ' if m.ci else '   '}{m.file:34s} {m.why}\n{'':48s}tests: {' '.join(m.tests)}")
    if problems:
        print("The mutation list does not match the source any more (fix the list in scripts/checks/mutation_test.py):",
              *problems, sep="\n  ", file=sys.stderr)
        return 2
    if args.list:
        print(f"\n{len(MUTATIONS)} mutants, {sum(m.ci for m in MUTATIONS)} in --subset ci; every pattern matches once")
        return 0

    chosen = select(args)
    work = Path(tempfile.mkdtemp(prefix="fwp-mutants-"))
    results, status = [], 0
    try:
        copy = make_copy(repo, work)
        print(f"{len(chosen)} mutants; copy of {repo} in {copy}", flush=True)
        if not args.no_baseline:
            baseline = run_pytest(copy, work, union_of_selections(chosen), "baseline", args.timeout * 3,
                                  stop_first=False)
            print(f"baseline (unmutated copy): rc={baseline['returncode']} in {baseline['seconds']} s", flush=True)
            if baseline["returncode"] in (98, 99):
                print(baseline["tail"], file=sys.stderr)
                return 4
            if baseline["returncode"] != 0:
                print("The tests fail without any mutant, so no result would mean anything:",
                      *(baseline["failed"] or [baseline["tail"]]), sep="\n  ", file=sys.stderr)
                return 3
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            if original.count(m.find) != 1:  # checked above; the copy must agree
                raise RuntimeError(f"{m.id}: pattern does not match the copy")
            path.write_text(original.replace(m.find, m.replace, 1))
            try:
                result = run_pytest(copy, work, m.tests, m.id, args.timeout, mutated_file=m.file)
            finally:
                path.write_text(original)
            result.update(id=m.id, file=m.file, status=classify(result), tests=list(m.tests), why=m.why)
            results.append(result)
            killers = ", ".join(t.split("/")[-1] for t in result["failed"][:2])
            print(f"{result['status']:12s} {m.id:44s} {result['seconds']:6.1f} s  {killers}", flush=True)
            if result["status"] == "not isolated":
                print(result["tail"], file=sys.stderr)
                return 4
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    survived = [r for r in results if r["status"] in ("survived", "no tests ran")]
    timeouts = [r for r in results if r["status"] == "timeout"]
    killed = [r for r in results if r["status"] == "killed"]
    print(f"\n{len(killed)} killed, {len(survived)} survived, {len(timeouts)} timed out (counted as killed), "
          f"{sum(r['seconds'] for r in results):.0f} s")
    for r in survived:
        print(f"SURVIVED {r['id']} ({r['file']}): {r['why']}\n  tests: {' '.join(r['tests'])}\n"
              + "\n".join("    " + line for line in r["tail"].strip().splitlines()[-5:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "mutations": [asdict(m) for m in chosen]},
                                              indent=1))
    if survived:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
