import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the entry scripts' modules (argparser, utils) and the package
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (lm_fixtures, procs) for tests in every folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CUDA paths run wherever a GPU is present (bench/gpu_check.sh runs these tests on a lent one); CI has none.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


# Small language models made here (no hub), shared by the model and activation-store tests.
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from lm_fixtures import make_hf_gpt2

    return make_hf_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def tl_model():
    from lm_fixtures import make_hooked_transformer

    from sparse_coding.models.language_model import TransformerLensModel
    from sparse_coding.models.tokenizer import Tokenizer

    model, tok = make_hooked_transformer()
    return TransformerLensModel(model, Tokenizer.from_hf(tok, "tiny-bpe"), "tiny-tl")
