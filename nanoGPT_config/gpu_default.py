"""A GPU-sized tiny transformer on OpenWebText with the GPT-2 tokenizer (~25M non-embedding parameters).

Prepare the corpus once where the Hugging Face hub is reachable:
    python scripts/prepare_corpus.py --source hub --dataset openwebtext --out data/openwebtext
then train on one GPU or many:
    python train_tiny.py --config nanoGPT_config/gpu_default.py
    torchrun --standalone --nproc_per_node=8 train_tiny.py --config nanoGPT_config/gpu_default.py
About 2.6B tokens; roughly an hour on 8 A100s, a few hours on one.
"""

out_dir = "checkpoints/tiny_gpu"
data_dir = "data/openwebtext"

n_layer = 6
n_head = 8
n_embd = 512
block_size = 1024
dropout = 0.0
bias = False

batch_size = 128  # sequences per step, over all processes: 131k tokens
micro_batch_size = 16  # per process and forward pass; lower it if the GPU runs out of memory
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 50
checkpoint_interval = 1000
log_interval = 50
sample_prompt = "The "

device = "auto"
dtype = "auto"  # bfloat16 where the GPU has it
compile = True
wandb_log = False  # True logs to wandb (WANDB_MODE=offline works without an account)
