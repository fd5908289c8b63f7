"""The tiny Llama the Hugging Face training scripts share: config, a word-level tokenizer, random data.

Seeded by the caller (`torch.manual_seed(0)` first), so each script's run is reproducible."""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

VOCAB = 64


def config() -> LlamaConfig:
    """Two layers, grouped-query attention, the embedding tied to the head (as most causal LMs are)."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                       tie_word_embeddings=True)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the vocabulary `t0` … `t63`: the release folder then has tokenizer files."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", pad_token="t1")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def data(n: int = 12) -> list[dict]:
    """`n` random sequences of 8 tokens with random labels."""
    return [{"input_ids": torch.randint(0, VOCAB, (8,)), "labels": torch.randint(0, VOCAB, (8,))} for _ in range(n)]
