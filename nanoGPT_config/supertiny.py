"""The original research code's "supertiny" transformer: 6 layers of width 16, 8 heads of size 2.

The shape is the original's; the corpus here is the offline Python-docs one (point data_dir at a corpus made
with `scripts/prepare_corpus.py --source hub ...` for web text with the GPT-2 tokenizer).
About 20k non-embedding parameters: fast anywhere, tens of minutes for max_iters on 2 CPU cores.
"""

out_dir = "checkpoints/supertiny"
data_dir = "data/pydocs"

n_layer = 6
n_head = 8
n_embd = 16
block_size = 256
dropout = 0.2
bias = True

batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0

eval_interval = 500
eval_iters = 20
checkpoint_interval = 500
log_interval = 50

device = "auto"
