"""Tiny random-weight Wan VAE and umT5 encoder saved like the real ones, for tests (no downloads)."""

from pathlib import Path

import torch

from echomotion.data.synthetic import ACTIONS, COLOURS

VAE_MEAN, VAE_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


def tiny_vae(path: Path) -> Path:
    """AutoencoderKLWan with z_dim 4 and 8 base channels (Wan's 8x spatial, 4x temporal compression)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     latents_mean=VAE_MEAN, latents_std=VAE_STD).save_pretrained(path)
    return path


def tiny_umt5(path: Path) -> Path:
    """A 16-wide UMT5EncoderModel and a word-level tokenizer over the HuMoVe-mini caption words (+ </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = sorted(set(COLOURS) | set(ACTIONS.values()) |
                   set("a an person in shirt and trousers on background slowly quickly".split()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)).save_pretrained(path)
    return path
