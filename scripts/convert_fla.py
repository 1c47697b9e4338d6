"""Convert an fla DeltaNet folder (flash-linear-attention's DeltaNetForCausalLM) into an FWP model folder.

    python scripts/convert_fla.py path/to/fla-delta-net path/to/fwp-delta-net
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('path/to/fwp-delta-net', trust_remote_code=True)"

The output folder is written beside its final place and moved in when complete (an existing one is replaced whole).
Options the FWP layer cannot express are refused, each named, with exit status 1 (see modeling_fwp/convert_fla.py).
"""

import argparse
import sys

from modeling_fwp.convert_fla import convert_fla


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_folder", help="fla DeltaNet folder: config.json and safetensors weights (+ tokenizer)")
    parser.add_argument("out_folder", help="FWP folder to write (replaced if it exists)")
    parser.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                        help="a config.json key this converter does not know, to ignore at your own risk (repeatable)")
    args = parser.parse_args(argv)
    try:
        out = convert_fla(args.src_folder, args.out_folder, ignore_keys=args.ignore_key)
    except (ValueError, FileNotFoundError) as error:
        print(f"convert_fla: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
