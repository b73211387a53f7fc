"""The offline end-to-end demo: the paper's controlled experiment (Table 2) in miniature.

A synthetic task with a programmatic ground truth; a tiny llama trained with TRL
(SFT, a reward model, DPO stopped at 10/20/40/100% of an epoch); then the
project's own `expo` sweep per checkpoint. Run it with `mergekit-expo demo`.
"""
