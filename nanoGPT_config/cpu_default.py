"""The CPU demo behind `make tiny`: ~0.8M non-embedding parameters on the offline Python-docs corpus.

A few minutes on 2 cores. n_embd 128 gives 512 MLP neurons per layer: wide enough that SAEs on
transformer.h.{i}.mlp have features to find.
"""

out_dir = "checkpoints/tiny"
data_dir = "data/pydocs"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
bias = True

batch_size = 32  # sequences per step, over all processes: 4096 tokens
max_iters = 800
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0

eval_interval = 200
eval_iters = 8
checkpoint_interval = 100
log_interval = 10
sample_prompt = "The "

device = "cpu"
