"""Prepare a corpus for the tiny transformer: train/val token files, tokenizer.json and meta.json in --out.

    python scripts/prepare_corpus.py                                  # offline default: Debian python3-doc
    python scripts/prepare_corpus.py --source dir --text_dir my_texts --out data/mine
    python scripts/prepare_corpus.py --source hub --dataset openwebtext --out data/openwebtext       # needs the hub
    python scripts/prepare_corpus.py --source hub --dataset monology/pile-uncopyrighted --max_documents 2000000 \\
        --out data/pile

The offline corpus needs the Debian package python3-doc (scripts/install_corpus_package.sh, or `make corpus`).
A folder that already holds a prepared corpus (meta.json) is left as it is unless --force is given.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from argparser import parse_config
from sparse_coding.data.corpus import (
    DEFAULT_CORPUS_DIR,
    META_FILE,
    find_text_files,
    prepare_debian_corpus,
    prepare_hub_corpus,
    prepare_text_corpus,
)
from sparse_coding.errors import UserError
from utils import run_main


@dataclass
class CorpusConfig:
    source: str = "debian"  # debian, dir or hub
    out: str = DEFAULT_CORPUS_DIR
    vocab_size: int = 4096  # byte-level BPE size for debian/dir (hub corpora use the hub tokenizer's)
    val_fraction: float = 0.0  # share of documents held out; 0 = 0.05 for debian/dir, 0.0005 for hub (as nanoGPT)
    text_dir: str = ""  # source dir: a folder of .txt/.md/.rst files
    dataset: str = "openwebtext"  # source hub: a datasets.load_dataset name
    tokenizer: str = "gpt2"  # source hub: an AutoTokenizer name
    max_documents: int = 0  # source hub: stream only this many documents (0 = all)
    num_proc: int = 8
    force: bool = False


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(CorpusConfig, __doc__, argv)
    out = Path(cfg.out)
    if (out / META_FILE).is_file() and not cfg.force:
        print(f"{out} already holds a prepared corpus (--force to rebuild)")
        return
    started = time.time()
    if cfg.source == "debian":
        meta = prepare_debian_corpus(out, cfg.vocab_size, cfg.val_fraction or 0.05)
    elif cfg.source == "dir":
        if not cfg.text_dir or not Path(cfg.text_dir).is_dir():
            raise UserError(f"--source dir needs --text_dir, a folder of text files (got {cfg.text_dir!r})")
        meta = prepare_text_corpus(find_text_files(cfg.text_dir), out, cfg.vocab_size, cfg.val_fraction or 0.05)
    elif cfg.source == "hub":
        meta = prepare_hub_corpus(
            cfg.dataset, out, cfg.tokenizer, cfg.val_fraction or 0.0005, cfg.num_proc, cfg.max_documents
        )
    else:
        raise UserError(f"--source must be debian, dir or hub, got {cfg.source!r}")
    print(
        f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens (vocab {meta['vocab_size']}) "
        f"in {out} ({time.time() - started:.0f} s)"
    )


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
