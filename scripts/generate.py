"""Generate text with a Fast Weight Programmer from a saved model folder or a preset (random weights).

    python scripts/generate.py path/to/model --prompt "The delta rule" --max_new_tokens 50
    python scripts/generate.py path/to/model --prompt_file prompts.txt --do_sample --top_p 0.9 --seed 0
    python scripts/generate.py deltanet-370m --prompt_ids 1,2,3 --device cuda --dtype bfloat16   # random weights

A single prompt is streamed token by token (TextStreamer); a prompt file (one prompt per line, blank lines skipped)
is generated as one left-padded batch. The state carried from token to token has a fixed size whatever the context
length, so long prompts can be prefilled in chunks (--prefill_chunk_size) to bound the prefill's activation memory.

A prompt that encodes to no tokens (`--prompt ""`) starts from the tokenizer's BOS token, as a document does in
training; with a tokenizer that has none it is an error. Prompt token ids the model has no embedding row for (a
tokenizer larger than the model's vocab_size) are an error naming the id, not an index error inside the model.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="saved model folder (save_pretrained) or a preset name (random weights)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt, streamed as it is generated ('' starts from the BOS token)")
    source.add_argument("--prompt_file", help="text file with one prompt per line, generated as a batch")
    source.add_argument("--prompt_ids", help="comma-separated token ids (for a preset without tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub name (default: the model folder)")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--prefill_chunk_size", type=int, help="prefill the prompt in chunks of this many tokens")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="load with the folder's own code (auto_map) instead of the installed modeling_fwp")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "num_beams", "prefill_chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.repetition_penalty <= 0:
        parser.error("need --temperature > 0, 0 < --top_p <= 1, --top_k >= 0 and --repetition_penalty > 0")
    return args


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_model(args, dtype):
    folder = Path(args.model)
    from transformers import AutoModelForCausalLM

    if args.trust_remote_code:
        if not folder.is_dir():
            fail(f"--trust_remote_code needs a model folder; {args.model!r} is not one")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=True), True
    try:
        import modeling_fwp  # registers model_type "fwp" with the Auto classes
    except ImportError:
        modeling_fwp = None
    if folder.is_dir():
        if not (folder / "config.json").exists():
            fail(f"model folder {str(folder)!r} has no config.json (expected a save_pretrained folder)")
        if modeling_fwp is None:  # the folder's own code, written by save_pretrained
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=True), True
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), True
    if "/" in args.model or "\\" in args.model or args.model.startswith("."):
        fail(f"model folder {args.model!r} does not exist")
    if modeling_fwp is None:
        fail(f"{args.model!r} is not a folder, and presets need the modeling_fwp package (pip install -e .)")
    if args.model not in modeling_fwp.list_presets():
        fail(f"model {args.model!r} is neither an existing folder nor a preset "
             f"({', '.join(modeling_fwp.list_presets())})")
    warnings.warn(f"preset {args.model!r}: the model has RANDOM weights, its output is noise", stacklevel=1)
    torch.manual_seed(args.seed)
    return modeling_fwp.FWPForCausalLM(modeling_fwp.load_preset(args.model)).to(dtype), False


def load_tokenizer(args, from_folder):
    from transformers import AutoTokenizer

    source = args.tokenizer or (args.model if from_folder else None)
    if source is None:
        if args.prompt_ids is None:
            fail(f"preset {args.model!r} comes without a tokenizer: pass --tokenizer or --prompt_ids")
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if args.prompt_ids is not None:
            return None
        fail(f"no tokenizer could be loaded from {source!r} ({error}); pass --tokenizer or --prompt_ids")
    tokenizer.padding_side = "left"  # a batch continues from each prompt's own last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            fail(f"--prompt_file {str(path)!r} does not exist")
        prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            fail(f"--prompt_file {str(path)!r} holds no non-empty line")
        return prompts
    try:
        return [[int(token) for token in args.prompt_ids.split(",")]]
    except ValueError:
        fail(f"--prompt_ids must be comma-separated integers, got {args.prompt_ids!r}")


def encode_prompts(args, tokenizer, prompts):
    """The prompts as one left-padded batch; a prompt of no tokens becomes the BOS token (an error without one)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    empty = (inputs["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        what = ("--prompt is empty" if args.prompt is not None else
                f"prompt {empty[0] + 1} of --prompt_file ({prompts[empty[0]]!r}) encodes to no tokens")
        bos = tokenizer.bos_token_id
        if bos is None:
            fail(f"{what} and the tokenizer has no BOS token to start from: give a prompt of at least one token")
        if inputs["input_ids"].shape[1] == 0:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
            inputs["input_ids"] = torch.full((len(prompts), 1), pad, dtype=torch.long)
            inputs["attention_mask"] = torch.zeros((len(prompts), 1), dtype=torch.long)
        inputs["input_ids"][empty, -1] = bos
        inputs["attention_mask"][empty, -1] = 1
    return inputs


def check_ids_fit(inputs, tokenizer, vocab_size):
    """Every prompt token (and the padding of a batch) must have a row in the model's embedding."""
    ids = inputs["input_ids"][inputs["attention_mask"].bool()]
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        bad = int(outside[0])
        fail(f"the prompt's token id {bad} ({tokenizer.convert_ids_to_tokens(bad)!r}) is outside the model's "
             f"vocabulary [0, {vocab_size}): the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
             f"{vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    pad = tokenizer.pad_token_id
    if inputs["input_ids"].shape[0] > 1 and pad is not None and not 0 <= pad < vocab_size:
        fail(f"the tokenizer's pad token id {pad} ({tokenizer.pad_token!r}) is outside the model's vocabulary "
             f"[0, {vocab_size}) (vocab_size {vocab_size}); a batch needs a pad token the model has a row for")


def main(argv=None):
    args = parse_args(argv)
    from transformers import GenerationConfig, TextStreamer

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompts = read_prompts(args)
    model, from_folder = load_model(args, dtype)
    model = model.to(device).eval()
    tokenizer = load_tokenizer(args, from_folder)

    vocab_size = model.config.vocab_size
    if isinstance(prompts[0], list):
        outside = [token for token in prompts[0] if not 0 <= token < vocab_size]
        if outside:
            fail(f"--prompt_ids: token id {outside[0]} is outside the model's vocabulary [0, {vocab_size}) "
                 f"(vocab_size {vocab_size})")
        inputs = {"input_ids": torch.tensor(prompts, device=device)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    else:
        inputs = encode_prompts(args, tokenizer, prompts)
        check_ids_fit(inputs, tokenizer, vocab_size)
        inputs = inputs.to(device)

    pad_id = tokenizer.pad_token_id if tokenizer is not None else model.config.pad_token_id
    eos_id = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, prefill_chunk_size=args.prefill_chunk_size,
        pad_token_id=pad_id if pad_id is not None else (eos_id if eos_id is not None else 0), eos_token_id=eos_id,
        **(dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.do_sample else {}),
    )
    # Streaming prints tokens as they come; beam search only knows its answer at the end.
    streamer = None
    if tokenizer is not None and len(prompts) == 1 and args.num_beams == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=config, streamer=streamer)
    if streamer is not None:
        return
    for row in output:
        if tokenizer is None:
            print(" ".join(str(t) for t in row.tolist()))
        else:
            print(tokenizer.decode(row, skip_special_tokens=True))
            if len(prompts) > 1:
                print("-" * 40)


if __name__ == "__main__":
    main()
