"""The parts of the synthetic retrieval experiments (paper Sec. 6.1), run by scripts/paper/synthetic_retrieval.py:

    task.py         what a run is (RunSpec) and the generator of its sequences and queries
    models.py       the models of many runs stacked on a run axis (RunBank), their feature maps and loss
    training.py     a bank of runs trained in lockstep with the paper's stopping rules; results.csv / curves.csv
    experiments.py  the runs of each mode, buckets, shards and the time budget; the merge of sharded folders
    report.py       the claims, tables and figures, and the section written into report.md / RESULTS.md
    estimate.py     the GPU time estimate of the full run (--estimate)
"""
