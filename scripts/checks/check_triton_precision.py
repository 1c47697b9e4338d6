"""GPU check that the Triton update-rule kernels compute their fp32 path in fp32: every CUDA case of
tests/test_ops_triton.py in fp32 as shipped, and again with the kernels' matmul precision forced to tf32. The fp32
errors must sit well below the test's tolerance and the tf32 ones above it, so that the test
(`test_cuda_fp32_matches_float64_loop`) would catch a kernel that slipped into tf32.

    python scripts/checks/check_triton_precision.py --json precision.json        # on a CUDA machine
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # scripts/checks/ -> the repository root
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from modeling_fwp import ops_triton_launch  # noqa: E402
from test_ops_triton import CUDA_CASES, FP32_TOLERANCE, run_case  # noqa: E402


def worst(errs):
    return max(v for k, v in errs.items() if k not in ("o_dtype_ok", "state_fp32"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU")
    rows = []
    real_init = ops_triton_launch._Plan.__init__

    def tf32_init(self, *a, **k):
        real_init(self, *a, **k)
        self.prec = "tf32"

    for name, spec in CUDA_CASES.items():
        fp32 = worst(run_case(spec, seed=1, device="cuda"))
        ops_triton_launch._Plan.__init__ = tf32_init
        try:
            tf32 = worst(run_case(spec, seed=1, device="cuda"))
        finally:
            ops_triton_launch._Plan.__init__ = real_init
        rows.append(dict(case=name, fp32_worst_rel_err=fp32, tf32_worst_rel_err=tf32,
                         caught=tf32 >= FP32_TOLERANCE > fp32))
        print(json.dumps(rows[-1]), flush=True)
    print(f"tolerance {FP32_TOLERANCE}: fp32 passes every case: {all(r['fp32_worst_rel_err'] < FP32_TOLERANCE for r in rows)}; "
          f"tf32 fails every case: {all(r['tf32_worst_rel_err'] >= FP32_TOLERANCE for r in rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
