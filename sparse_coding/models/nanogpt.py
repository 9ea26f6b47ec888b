"""Our own GPT, in the manner of karpathy's nanoGPT model.py, laid out like Hugging Face GPT-2.

Module paths hooks can address (each returns a plain Tensor [batch, seq, n_embd]):
    transformer.wte, transformer.wpe     token and position embeddings
    transformer.h.{i}                    block i; its output is the residual stream after layer i
    transformer.h.{i}.attn               attention output, before it is added to the residual stream
    transformer.h.{i}.mlp                MLP output, before it is added to the residual stream
    transformer.ln_f                     final layer norm
    lm_head                              logits [batch, seq, vocab_size]

A checkpoint folder (DESIGN.md contract) holds config.json, model.safetensors, tokenizer.json and
train_summary.json; `load_checkpoint` reads it, `save_checkpoint` writes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch import Tensor
from torch.nn import functional as F

from sparse_coding.errors import ModelError
from sparse_coding.files import atomic_write, read_json, save_tensors, write_json

if TYPE_CHECKING:
    import tokenizers
    import transformers

DEFAULT_TINY_CHECKPOINT = "checkpoints/tiny"  # where `make tiny` leaves the offline default model for run.py
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, SUMMARY_FILE = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "train_summary.json",
)
EOT_TOKEN = "<|endoftext|>"


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # longest context the position embedding covers
    vocab_size: int = 4096
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2

    def check(self) -> None:
        """Raises ValueError naming the first impossible setting."""
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # [B, T, C] -> [B, n_head, T, head_size]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # flash attention where the device has it
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exposed as a module so `transformer.h.{i}.mlp.gelu` hooks the neurons
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.check()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the projections into the residual stream
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Gives the parameter count; the position embedding is left out by default, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Gives logits [B, T, vocab_size] for idx [B, T]; with targets [B, T], (logits, mean cross-entropy)."""
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.config.block_size}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], fused: bool = False
    ) -> torch.optim.AdamW:
        """Gives AdamW with weight decay on matrices and embeddings only (not on biases and norms)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Gives idx [B, T] extended by max_new_tokens sampled tokens; the context is cropped to block_size."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# ---- checkpoint folder (DESIGN.md contract) ----


def model_tensors(model: GPT) -> dict[str, Tensor]:
    """Gives the state dict without lm_head.weight: it is tied to transformer.wte.weight, and safetensors
    refuses tensors that share memory."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_checkpoint(
    folder: str | Path,
    model: GPT,
    tokenizer: tokenizers.Tokenizer | transformers.PreTrainedTokenizerFast,
    train_summary: dict[str, float | int],
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Writes the checkpoint folder, each file under a temporary name then renamed; config.json goes last and
    is removed first, so a folder that has config.json is always complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a transformers fast tokenizer wraps one
    save_tensors(folder / WEIGHTS_FILE, model_tensors(model))
    atomic_write(folder / TOKENIZER_FILE, lambda p: backend.save(str(p)))
    write_json(folder / SUMMARY_FILE, train_summary)
    write_json(
        folder / CONFIG_FILE, {"architecture": "nanogpt", **dataclasses.asdict(model.config), **(extra_config or {})}
    )
    return folder


def load_checkpoint(folder: str | Path) -> tuple[GPT, transformers.PreTrainedTokenizerFast, dict[str, Any]]:
    """Gives (model in eval mode, float32, on cpu; its tokenizer (`load_tokenizer`); the whole config.json)
    from a checkpoint folder."""
    folder = Path(folder)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / f).is_file()]
    if missing:
        raise ModelError(
            f"{folder} is not a tiny-transformer checkpoint (missing {', '.join(missing)}); train one with `make tiny`"
        )
    config = read_json(folder / CONFIG_FILE)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in config.items() if k in fields}))
    state = load_file(str(folder / WEIGHTS_FILE))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    model.float().eval()
    return model, load_tokenizer(folder), config


def load_tokenizer(folder: str | Path) -> transformers.PreTrainedTokenizerFast:
    """Gives a checkpoint's tokenizer: a transformers PreTrainedTokenizerFast over tokenizer.json, with
    <|endoftext|> as its bos/eos token; its `.backend_tokenizer` is the plain `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast  # slow to import; only loading needs it

    return PreTrainedTokenizerFast(
        tokenizer_file=str(Path(folder) / TOKENIZER_FILE), bos_token=EOT_TOKEN, eos_token=EOT_TOKEN
    )
